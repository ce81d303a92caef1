"""TI and LoRA on a random-weight model with SD1.5's real shapes, read from a single-file checkpoint (about two
minutes on CPU).

The outputs must be what A1111 and ComfyUI load for an SD1.x model: an embedding of width 768, and a LoRA whose every
key the clients' own name rules map to a layer of the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from client_rules import (
    a1111_embedding_vectors,
    a1111_unmatched_keys,
    comfyui_embedding_vectors,
    comfyui_key_map,
    comfyui_unloaded_keys,
)
from sdtune import models
from sdtune.config import parse_config
from sdtune.train import train

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sd15_checkpoint(tmp_path_factory) -> Path:
    checkpoint = tmp_path_factory.mktemp("sd15") / "v1-5-random.safetensors"
    models.write_base_model(None, checkpoint, preset="sd15", seed=1, dtype=torch.float16)
    return checkpoint


@pytest.mark.slow
def test_ti_on_sd15_shaped_single_file_loads_in_a1111_and_comfyui_at_width_768(sd15_checkpoint, tmp_path):
    checkpoint = sd15_checkpoint
    shapes, metadata = models.read_checkpoint_header(checkpoint)
    assert models.EMBEDDED_CONFIG_KEY not in metadata  # read through the shipped SD1.5 config, like a real file
    assert shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)

    config = parse_config(
        {
            "method": "ti",
            "base_model": str(checkpoint),
            "train_data_dir": str(REPO_ROOT / "sample_data" / "star"),
            "placeholder_token": "<star>",
            "init_word": "star",
            "num_vectors": 2,
            "resolution": 64,
            "max_steps": 1,
            "output_dir": str(tmp_path / "out"),
            "output_name": "star",
        }
    )
    result = train(config)
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.last_loss))
    with safe_open(str(result.final_path), "pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        vectors = handle.get_tensor("emb_params")
        assert handle.metadata()["sdtune.text_encoder_width"] == "768"
    assert vectors.shape == (2, 768) and vectors.dtype == torch.float32
    torch.testing.assert_close(a1111_embedding_vectors(result.final_path, expected_width=768), vectors)
    torch.testing.assert_close(comfyui_embedding_vectors(result.final_path, embedding_size=768), vectors)
    # Both clients refuse it for a model of another width (SD2.x: 1024), as they should.
    assert a1111_embedding_vectors(result.final_path, expected_width=1024) is None
    assert comfyui_embedding_vectors(result.final_path, embedding_size=1024) is None


@pytest.mark.slow
def test_lora_on_sd15_shaped_single_file_is_consumed_by_comfyui_and_matched_by_a1111(sd15_checkpoint, tmp_path):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = parse_config(
        {
            "base_model": str(sd15_checkpoint),
            "train_data_dir": str(REPO_ROOT / "sample_data" / "star"),
            "resolution": 64,
            "max_steps": 1,
            "learning_rate": 1e-3,
            "conv_rank": 4,
            "output_dir": str(tmp_path / "out"),
        }
    )
    result = train(config)
    tensors = load_file(str(result.final_path))
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    unet_modules = [m for m in modules if m.startswith("lora_unet_")]
    locon = [m for m in unet_modules if "_resnets_" in m or "samplers_" in m]
    assert len(unet_modules) - len(locon) == 192  # kohya's transformer-block set on SD1.5
    assert len(locon) == 64  # 22 ResNets x (conv1, conv2) + 14 shortcuts + 3 down- and 3 upsamplers
    assert len([m for m in modules if m.startswith("lora_te_text_model_")]) == 72
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (8, 1280, 1, 1)

    checkpoint_keys = models.read_checkpoint_header(sd15_checkpoint)[0]
    ldm_unet_keys = [k for k in checkpoint_keys if k.startswith("model.diffusion_model.")]
    with init_empty_weights():
        diffusers_names = UNet2DConditionModel.from_config(models.preset_configs("sd15")["unet"]).state_dict()
    key_map = comfyui_key_map(diffusers_names, ldm_unet_keys, num_text_layers=12)
    assert comfyui_unloaded_keys(tensors, key_map) == []
    assert a1111_unmatched_keys(tensors, checkpoint_keys) == []
    unchanged = [m for m in modules if not tensors[m + ".lora_up.weight"].abs().sum() > 0]
    assert unchanged == [], "every targeted weight changes after a step"
