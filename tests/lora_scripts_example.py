"""The lora-scripts style config from the issue tracker, verbatim: sdtune must accept and train it."""

LORA_SCRIPTS_EXAMPLE = """\
train_data_dir: "./data/anime_style"
metadata_path: "./data/anime_style/metadata.csv"
base_model: "./models/Stable-diffusion/v1-5-pruned.safetensors"
lora_rank: 8
lora_alpha: 16
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "./output/anime_lora"
save_steps: 100
"""
