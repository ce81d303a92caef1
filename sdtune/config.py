"""Typed, validated training configuration.

A YAML file (flat keys, the lora-scripts habit) plus `key=value` overrides becomes one frozen `TrainConfig`. Every
problem is collected and reported together: unknown keys (with the closest valid key), wrong types (naming the key,
the value and what is expected), values out of range, settings that contradict each other, and missing files and
folders. Nothing here loads a model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from sdtune.errors import SdtuneError

METHODS = ("ti", "lora", "ti+lora")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SOURCES = ("auto", "metadata", "files")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")


class ConfigError(SdtuneError):
    """One or more problems with a configuration, all reported at once."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = list(errors)
        self.source = source
        super().__init__(f"{source}: {len(self.errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in self.errors))


def _field(
    default, doc: str, group: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None
):
    """A config field with its one-line documentation, its section, and its range (`ge`: at least, `gt`: greater
    than, `le`: at most)."""
    return field(default=default, metadata={"doc": doc, "group": group, "ge": ge, "gt": gt, "le": le})


@dataclass(frozen=True)
class Subset:
    """One image folder and how its captions are found and used: an entry of `subsets`, a kohya repeat folder, or
    `train_data_dir` itself.

    In a config a subset names its `image_dir` and may set any caption setting below. Each of those has a top-level key
    of the same name whose type, range and documentation apply; an unset one (None) takes the top-level value
    (`data.resolve_subsets` fills them in). `is_reg: true` marks regularization images. `source` is not a config key:
    it names the key the folder came from, for messages.
    """

    image_dir: str
    num_repeats: Optional[int] = None
    metadata_path: Optional[str] = None
    caption_column: Optional[str] = None
    caption_source: Optional[str] = None
    caption_extension: Optional[str] = None
    class_tokens: Optional[str] = None
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    shuffle_caption: Optional[bool] = None
    keep_tokens: Optional[int] = None
    caption_dropout_rate: Optional[float] = None
    is_reg: bool = False  # regularization (class) images: loss weighted by prior_loss_weight
    source: str = field(default="train_data_dir", metadata={"internal": True})

    @property
    def folder(self) -> Path:
        """`image_dir` as a path."""
        return Path(self.image_dir)

    @property
    def name(self) -> str:
        """What `ss_dataset_dirs` and the dry run call the subset: its folder's name."""
        return self.folder.name


SUBSET_KEYS = tuple(f.name for f in dataclasses.fields(Subset) if not f.metadata.get("internal"))


@dataclass(frozen=True)
class TrainConfig:
    """Everything `sdtune train` needs. Each field's `metadata["doc"]` is its one-line documentation."""

    # --- what to train
    method: Literal[METHODS] = _field(
        "lora", "What to train: `ti` (textual inversion), `lora`, or `ti+lora` (both jointly).", "method"
    )
    placeholder_token: Optional[str] = _field(
        None, "TI: the new token to learn, e.g. `<mychar>`; must not be an existing CLIP vocabulary word.", "method"
    )
    init_word: Optional[str] = _field(
        None, "TI: word(s) whose embedding starts the new vectors, e.g. `woman` or `toy robot`.", "method"
    )
    num_vectors: int = _field(
        1,
        "TI: vectors per placeholder; more vectors hold more detail but cost prompt tokens.",
        "method",
        ge=1,
    )
    learnable_property: Literal["object", "style"] = _field(
        "object", "TI: prompt templates used when the dataset has no captions: `object` or `style`.", "method"
    )
    embedding_lr: float = _field(
        5e-4,
        "ti+lora: learning rate of the embedding vectors (the LoRA uses unet_lr / text_encoder_lr).",
        "method",
        gt=0,
    )
    embedding_train_fraction: float = _field(
        1.0,
        "ti+lora: train the embedding for this fraction of the steps, then freeze it.",
        "method",
        gt=0,
        le=1,
    )
    lora_rank: Optional[int] = _field(
        None,
        "LoRA: rank of the update (kohya `network_dim`; default 8, or the rank in `network_weights`).",
        "method",
        ge=1,
    )
    lora_alpha: Optional[float] = _field(
        None,
        "LoRA: alpha; the update is scaled by alpha / rank (kohya `network_alpha`; default = rank).",
        "method",
        gt=0,
    )
    lora_targets: Optional[Literal["kohya", "attention", "cross_attention", "cross_attention_kv"]] = _field(
        None,
        "LoRA: `kohya` (all Linear/1x1 layers of the transformer blocks; default), `attention` (self- and "
        "cross-attention projections), `cross_attention` (the UNet's text-reading attention only) or "
        "`cross_attention_kv` (only its key/value projections of the text states, as Custom Diffusion).",
        "method",
    )
    conv_rank: Optional[int] = _field(
        None,
        "LoRA: also adapt ResNet/down/upsampling 3x3 convs at this rank (LoCon; kohya `conv_dim`).",
        "method",
        ge=1,
    )
    conv_alpha: Optional[float] = _field(
        None, "LoRA: alpha of the LoCon convs (kohya `conv_alpha`; default = conv_rank).", "method", gt=0
    )
    train_unet: Optional[bool] = _field(None, "LoRA: adapt the UNet (default true).", "method")
    train_text_encoder: Optional[bool] = _field(
        None, "LoRA: adapt the text encoder too (default true, as kohya; false = UNet only).", "method"
    )
    network_weights: Optional[str] = _field(
        None, "LoRA: continue from this kohya-format LoRA file; rank, alpha and modules come from it.", "method"
    )
    prior_preservation_prompts: tuple[str, ...] = _field(
        (),
        "LoRA: prompts whose results must not change (e.g. `a photo of a dog`). Each step also pulls the LoRA "
        "model's prediction for them towards the base model's (adapters off) on the same noisy latents.",
        "method",
    )
    prior_loss_weight: float = _field(
        1.0,
        "Weight of the prior-preservation loss: of prior_preservation_prompts, and of regularization images "
        "(`reg_data_dir`, subsets with `is_reg`) as in kohya / DreamBooth; needs one of them.",
        "method",
        ge=0,
    )
    # --- model
    base_model: Optional[str] = _field(
        None,
        "Base model: a diffusers folder or a single-file `.safetensors` / `.ckpt` checkpoint (required).",
        "model",
    )
    base_model_config: Optional[str] = _field(
        None,
        "Single-file checkpoints only: a diffusers folder with the model's configs, for non-standard shapes.",
        "model",
    )
    vae: Optional[str] = _field(
        None,
        "A VAE to use instead of the base model's: a diffusers AutoencoderKL folder, or a `.safetensors` file of "
        "one (diffusers or original layout), e.g. an fp16-safe SDXL VAE.",
        "model",
    )
    zero_terminal_snr: bool = _field(
        False,
        "Rescale the noise schedule to zero terminal SNR (Lin et al. 2024; kohya `--zero_terminal_snr`): the last "
        "timestep is pure noise. For v-prediction models trained that way (NoobAI-XL V-Pred); set by itself when a "
        "checkpoint carries the `ztsnr` marker.",
        "model",
    )
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = _field(
        None,
        "What the UNet predicts (kohya `v_parameterization: true` = `v_prediction`); default: what the base says "
        "(a folder's scheduler config; for a single file a `<checkpoint>.yaml` beside it, its `v_pred` marker, "
        "else its family's published model; SD2.x files that say nothing are probed, with a warning). Set it for "
        "SD2.x 768-v single files (`v_prediction`) or 512-base ones (`epsilon`) to skip the probe.",
        "model",
    )
    # --- data
    train_data_dir: Optional[str] = _field(
        None,
        "Folder with the training images, or with kohya repeat folders (`10_mychar woman/`: 10 repeats, class tokens "
        "`mychar woman`). Required unless `subsets` is given.",
        "data",
    )
    subsets: tuple[Subset, ...] = _field(
        (),
        "Several image folders, each a mapping with `image_dir` and any of "
        + ", ".join(f"`{key}`" for key in SUBSET_KEYS if key not in ("image_dir", "is_reg"))
        + " (unset ones take the top-level values), and `is_reg: true` for regularization images.",
        "data",
    )
    reg_data_dir: Optional[str] = _field(
        None,
        "Regularization (class) images, as kohya `reg_data_dir`: a folder of repeat folders (`1_woman/`) or of "
        "images with captions. Their loss is weighted by prior_loss_weight; each epoch uses as many regularization "
        "samples as training samples (repeated or cut, as kohya).",
        "data",
    )
    bad_images: Literal[("error", "skip")] = _field(
        "error",
        "What an unusable image (does not decode, too large, shorter side under an eighth of `resolution`) does: "
        "`error` stops before training; `skip` leaves it out and lists it.",
        "data",
    )
    num_repeats: int = _field(1, "Times each image is seen per epoch (kohya repeats).", "data", ge=1)
    caption_source: Literal[CAPTION_SOURCES] = _field(
        "auto",
        "Where captions come from: `metadata` (metadata.csv), `files` (`<image stem><caption_extension>`), or "
        "`auto` (whichever exists; both existing is an error).",
        "data",
    )
    caption_extension: str = _field(
        ".txt", "Extension of per-image caption files (kohya's default is `.caption`).", "data"
    )
    class_tokens: Optional[str] = _field(
        None, "Caption for images that have none (kohya class tokens, e.g. `mychar woman`).", "data"
    )
    caption_prefix: Optional[str] = _field(
        None, "Text put before every caption, e.g. a trigger word `mychar,`; never shuffled.", "data"
    )
    caption_suffix: Optional[str] = _field(None, "Text put after every caption; never shuffled.", "data")
    shuffle_caption: bool = _field(
        False, "Shuffle the comma-separated tags of each caption every time it is used.", "data"
    )
    keep_tokens: int = _field(0, "With `shuffle_caption`: the first N tags of a caption stay in place.", "data", ge=0)
    caption_dropout_rate: float = _field(
        0.0, "Fraction of samples trained with an empty caption (helps classifier-free guidance).", "data", ge=0, le=1
    )
    metadata_path: Optional[str] = _field(
        None, "CSV with `file_name` and caption columns; default `<train_data_dir>/metadata.csv` if present.", "data"
    )
    caption_column: str = _field("text", "Caption column of the metadata CSV.", "data")
    resolution: Optional[int] = _field(
        None,
        "Training resolution in pixels (square; a multiple of 8); default: the base model family's native size "
        "(SD1.x 512, SDXL 1024).",
        "data",
        ge=8,
    )
    enable_bucket: bool = _field(
        False,
        "Aspect-ratio buckets: each image trains at the bucket size (multiples of `bucket_reso_steps`, area <= "
        "resolution^2) closest to its aspect ratio instead of a square crop; batches come from one bucket.",
        "data",
    )
    min_bucket_reso: Optional[int] = _field(
        None, "Buckets: smallest side in pixels (default: half the resolution, in bucket_reso_steps).", "data", ge=8
    )
    max_bucket_reso: Optional[int] = _field(
        None, "Buckets: largest side in pixels (default: twice the resolution, in bucket_reso_steps).", "data", ge=8
    )
    bucket_reso_steps: Optional[int] = _field(
        None,
        "Buckets: sides are multiples of this (a multiple of 8); default 64, or a quarter of the resolution below "
        "256 (so small test resolutions still get buckets).",
        "data",
        ge=8,
    )
    bucket_no_upscale: bool = _field(
        False,
        "Buckets: never upscale; an image smaller than resolution^2 trains at its own size rounded down to "
        "`bucket_reso_steps`, a larger one is scaled down to that area.",
        "data",
    )
    cache_latents: bool = _field(
        False,
        "Encode every image with the VAE once before training (needs center_crop; with random_flip both "
        "orientations are cached) instead of at every step.",
        "data",
    )
    cache_latents_to_disk: bool = _field(
        False,
        "With cache_latents: also keep them in sdtune's cache folder, keyed by image content, size, crop, flip and "
        "VAE, so later runs skip encoding (an edited image is re-encoded).",
        "data",
    )
    cache_text_encoder_outputs: bool = _field(
        False,
        "Encode each distinct caption once (only when nothing in the text path trains: no TI, no text-encoder LoRA).",
        "data",
    )
    center_crop: bool = _field(True, "Crop the centre of each image after resizing; false crops at random.", "data")
    random_flip: bool = _field(
        False, "Flip images horizontally at random (leave off for asymmetric subjects).", "data"
    )
    # --- optimisation
    learning_rate: Optional[float] = _field(
        None,
        "Learning rate; default 5e-3 for `ti`, 1e-4 for `lora`. `2e-4` and other forms are accepted.",
        "optim",
        gt=0,
    )
    unet_lr: Optional[float] = _field(
        None, "LoRA: learning rate of the UNet LoRA (default `learning_rate`).", "optim", gt=0
    )
    text_encoder_lr: Optional[float] = _field(
        None, "LoRA: learning rate of the text-encoder LoRA (default `learning_rate`).", "optim", gt=0
    )
    lr_scheduler: Literal[LR_SCHEDULERS] = _field("constant", "Learning-rate schedule after warm-up.", "optim")
    lr_warmup_steps: int = _field(0, "Optimizer steps of linear warm-up from 0 to `learning_rate`.", "optim", ge=0)
    adam_weight_decay: float = _field(1e-2, "AdamW weight decay.", "optim", ge=0)
    optimizer_type: Literal[OPTIMIZERS] = _field(
        "adamw",
        "`adamw` (torch), `adamw8bit` (bitsandbytes, when installed: less optimizer memory) or `prodigy` (prodigyopt, "
        "when installed: sets its own step size; use learning_rate 1).",
        "optim",
    )
    max_grad_norm: Optional[float] = _field(
        None,
        "Clip the gradient norm of the trainable parameters to this (kohya and diffusers use 1.0).",
        "optim",
        gt=0,
    )
    min_snr_gamma: Optional[float] = _field(
        None,
        "Min-SNR loss weighting (Hang et al. 2023): each timestep's loss weighted by min(SNR, gamma) / SNR "
        "(epsilon) or / (SNR + 1) (v-prediction); 5 is the paper's value.",
        "optim",
        gt=0,
    )
    clip_skip: int = _field(
        1,
        "Text-encoder layer the UNet reads, counted from the end as kohya and A1111 do: 1 = last, 2 = penultimate "
        "(NovelAI-style anime models). Use what the base model was trained with, and the same when generating.",
        "optim",
        ge=1,
    )
    mixed_precision: Literal[("no", "fp16", "bf16")] = _field(
        "no",
        "Run forward passes in half precision (autocast) with the frozen weights stored in it; trainable parameters "
        "stay float32 (fp16 adds a gradient scaler on GPU). bf16 needs an Ampere+ GPU or a recent CPU.",
        "optim",
    )
    no_half_vae: bool = _field(
        False, "With mixed_precision: keep the VAE in float32 (SD's VAE can overflow in fp16: NaN latents).", "optim"
    )
    gradient_checkpointing: bool = _field(
        False, "Recompute UNet activations in the backward pass: less memory, ~20-30% slower steps.", "optim"
    )
    xformers: bool = _field(
        False,
        "Attention through xformers' memory-efficient kernels (CUDA, `pip install xformers`; it pins its own torch). "
        "Off: PyTorch's scaled_dot_product_attention, which is as fast on current torch.",
        "optim",
    )
    torch_compile: bool = _field(
        False,
        "Compile the UNet with torch.compile, adapters in place (fewer kernel launches and Python per step). The "
        "first steps compile (seconds on small models, minutes at SD size; again for each new bucket size); results "
        "match eager within float tolerance. Needs a C++ compiler on a CPU.",
        "optim",
    )
    tf32: bool = _field(
        False,
        "CUDA, Ampere or newer, fp32 math (mixed_precision: no): matmuls and convolutions in TF32 (10-bit mantissa "
        "inputs, float32 accumulation), several times faster than strict float32, about 1e-3 relative error.",
        "optim",
    )
    noise_offset: float = _field(
        0.0,
        "Add this x a per-image, per-channel constant to the noise (kohya `noise_offset`; 0.05-0.1 helps flat, very "
        "dark or bright images). Use what the base model was trained with.",
        "optim",
        ge=0,
    )
    min_timestep: int = _field(
        0, "Train on noise levels t >= this (kohya `min_timestep`; the schedule has 1000 steps).", "optim", ge=0
    )
    max_timestep: int = _field(
        1000,
        "Train on noise levels t < this (kohya `max_timestep`). Below ~700 the layout and colours of an image are "
        "already fixed, so a LoRA trained only there changes details and leaves composition to the base model.",
        "optim",
        ge=1,
    )
    batch_size: int = _field(1, "Images per forward pass.", "optim", ge=1)
    gradient_accumulation_steps: int = _field(
        1, "Forward passes per optimizer step; effective batch = batch_size x this.", "optim", ge=1
    )
    epochs: int = _field(10, "Passes over the dataset; ignored when `max_steps` is set.", "optim", ge=1)
    max_steps: Optional[int] = _field(None, "Optimizer steps to train; overrides `epochs`.", "optim", ge=1)
    seed: int = _field(
        42,
        "Seed for noise, timesteps, data order and crops; equal seeds give equal runs.",
        "optim",
        ge=0,
        le=2**63 - 1,
    )
    dataloader_num_workers: int = _field(
        0, "Worker processes loading images (0: in the training process).", "optim", ge=0
    )
    # --- output
    output_dir: str = _field("output", "Folder for the trained files and logs.", "output")
    output_name: Optional[str] = _field(
        None,
        "File stem: the embedding's for `ti` (default: placeholder without `<>`), the LoRA's otherwise (default: the "
        "data folder's name for `lora`, `<placeholder>_lora` for `ti+lora`).",
        "output",
    )
    save_precision: Literal["fp16", "bf16", "fp32"] = _field("fp16", "LoRA: dtype of the saved factors.", "output")
    export_formats: tuple[Literal["kohya", "diffusers"], ...] = _field(
        ("kohya",),
        "LoRA: `kohya` (WebUI/ComfyUI/diffusers) and optionally `diffusers` (peft layout folder).",
        "output",
    )
    save_steps: Optional[int] = _field(
        None, "Also save every N optimizer steps (`<name>-step00000100.*`).", "output", ge=1
    )
    save_state: bool = _field(
        True,
        "With every save (and at the end, and on Ctrl-C / SIGTERM) also write the resumable training state to "
        "`<output_dir>/state/step-N/` (weights, optimizer, LR schedule, RNG states, position in the data).",
        "output",
    )
    keep_last_n: Optional[int] = _field(3, "Keep only the newest N training states (null: keep all).", "output", ge=1)
    overwrite: bool = _field(
        False,
        "Start a new run in an output_dir that holds another run's outputs, deleting what sdtune wrote there "
        "(trained files, states, sample grids; nothing else). Without it such a folder is refused.",
        "output",
    )
    resume: Optional[str] = _field(
        None,
        "Continue from a saved state: `latest` (the newest in output_dir) or a state folder. The result equals an "
        "uninterrupted run with the same config.",
        "output",
    )
    logging_dir: Optional[str] = _field(
        None, "Folder of the TensorBoard events and wandb files; default `<output_dir>/logs`.", "output"
    )
    log_with: Literal[("tensorboard", "wandb", "all")] = _field(
        "tensorboard",
        "Where scalars, sample grids and settings go: `tensorboard`, `wandb` (Weights & Biases through accelerate; "
        "`pip install 'sdtune[wandb]'`, `WANDB_MODE=offline` keeps it local) or `all`.",
        "output",
    )
    log_tracker_name: str = _field("sdtune", "wandb project name (kohya `log_tracker_name`).", "output")
    sample_prompts: tuple[str, ...] = _field(
        (),
        "Prompts rendered before training, with every save and at the end (`samples/` PNG grids, TensorBoard).",
        "output",
    )
    sample_every_n_steps: Optional[int] = _field(
        None,
        "Render the sample prompts every N steps too (default: only before, at saves, at the end).",
        "output",
        ge=1,
    )
    sample_steps: int = _field(20, "Sampler steps for the samples (DPM-Solver++).", "output", ge=1, le=1000)
    sample_guidance_scale: float = _field(7.5, "Classifier-free guidance of the samples.", "output", ge=0, le=100)

    @property
    def uses_ti(self) -> bool:
        """True when the method trains a textual-inversion embedding."""
        return self.method in ("ti", "ti+lora")

    @property
    def uses_reg_images(self) -> bool:
        """True with `reg_data_dir` or a subset marked `is_reg`."""
        return bool(self.reg_data_dir) or any(subset.is_reg for subset in self.subsets)

    @property
    def uses_lora(self) -> bool:
        """True when the method trains a LoRA."""
        return self.method in ("lora", "ti+lora")

    @property
    def embedding_name(self) -> str:
        """File stem of the embedding (the A1111 trigger word): `output_name` for `ti`, else the placeholder's."""
        if self.method == "ti" and self.output_name:
            return self.output_name
        return re.sub(r"[^\w.-]+", "", self.placeholder_token or "") or "embedding"

    @property
    def effective_lora_rank(self) -> int:
        """`lora_rank`, default 8 (unset with `network_weights`: the file's ranks)."""
        return self.lora_rank or 8

    @property
    def effective_lora_alpha(self) -> float:
        """`lora_alpha`, default = the rank (scale 1; unset with `network_weights`: the file's alphas)."""
        return self.lora_alpha if self.lora_alpha is not None else float(self.effective_lora_rank)

    @property
    def conv(self) -> tuple[int, float] | None:
        """(rank, alpha) of the LoCon convs, or None without LoCon."""
        if self.conv_rank is None:
            return None
        return self.conv_rank, self.conv_alpha if self.conv_alpha is not None else float(self.conv_rank)

    def group_learning_rates(self) -> dict[str, float]:
        """Learning rate per trainable group: `unet`, `text_encoder` (LoRA) and `embedding` (TI)."""
        embedding = self.learning_rate if self.method == "ti" else self.embedding_lr
        return {"unet": self.unet_lr, "text_encoder": self.text_encoder_lr, "embedding": embedding}


def _default_output_name(config: TrainConfig) -> str:
    """The main output's file stem when `output_name` is unset: the embedding's for `ti`, `<embedding>_lora` for
    `ti+lora`, the data folder's name for `lora`."""
    if config.method == "ti":
        return config.embedding_name
    if config.method == "ti+lora":
        return f"{config.embedding_name}_lora"
    return Path(config.train_data_dir or "lora").resolve().name or "lora"


def _bucket_defaults(config: TrainConfig) -> TrainConfig:
    """Unset bucket settings from the resolution: steps of 64 (a quarter of the resolution below 256), bounds half
    and twice the resolution in those steps (512 -> 256..1024, kohya's defaults)."""
    resolution = config.resolution
    step = config.bucket_reso_steps or (64 if resolution >= 256 else max(8, resolution // 4 // 8 * 8))
    low = config.min_bucket_reso or max(step, resolution // 2 // step * step)
    high = config.max_bucket_reso or -(-resolution * 2 // step) * step
    return dataclasses.replace(config, bucket_reso_steps=step, min_bucket_reso=low, max_bucket_reso=high)


def with_native_resolution(config: TrainConfig, native: int) -> TrainConfig:
    """The config with the defaults that follow from the base model's family: `resolution` (its native size) and the
    bucket bounds (from the resolution).

    Raises:
        ConfigError: Bucket bounds that do not fit the resolution.
    """
    config = _bucket_defaults(dataclasses.replace(config, resolution=config.resolution or native))
    errors = _bucket_errors(config) if config.enable_bucket else []
    if errors:
        raise ConfigError(errors)
    return config


def _resolve_defaults(config: TrainConfig) -> TrainConfig:
    """Fills in the defaults that follow from other settings (the method's learning rate, per-part rates, file
    stem, log folder, bucket bounds), so every reader sees one resolved value. Settings of other methods stay unset;
    the family-dependent ones are filled by `with_native_resolution` once the base model's family is known."""
    rate = config.learning_rate if config.learning_rate is not None else (5e-3 if config.method == "ti" else 1e-4)
    resolved = {
        "learning_rate": rate,
        "output_name": config.output_name or _default_output_name(config),
        "logging_dir": config.logging_dir or str(Path(config.output_dir) / "logs"),
    }
    if config.uses_lora:
        resolved["unet_lr"] = config.unet_lr or rate
        resolved["text_encoder_lr"] = config.text_encoder_lr or rate
    config = dataclasses.replace(config, **resolved)
    return _bucket_defaults(config) if config.resolution is not None else config


# Keys from kohya sd-scripts and the diffusers example scripts, accepted as they are.
ALIASES = {
    "pretrained_model_name_or_path": "base_model",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "num_train_epochs": "epochs",
    "max_train_steps": "max_steps",
    "network_dim": "lora_rank",
    "network_alpha": "lora_alpha",
    "token_string": "placeholder_token",
    "initializer_token": "init_word",
    "num_vectors_per_token": "num_vectors",
    "save_every_n_steps": "save_steps",
    "conv_dim": "conv_rank",
    "lr_warmup": "lr_warmup_steps",
}
# Flags of other trainers whose setting has another form here.
RENAMED_FLAGS = {
    "v_parameterization": "prediction_type: v_prediction",
    "sdpa": "nothing: PyTorch SDPA is the default attention (xformers: true for xformers)",
    "mem_eff_attn": "xformers: true",
}
_REQUIRED = ("base_model",)
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _expected_type(annotation) -> tuple[type, tuple | None, bool]:
    """(base type, allowed choices or None, optional?) of a field; base type `tuple` is a list of choices."""
    hint = typing.get_type_hints(TrainConfig)[annotation]
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if typing.get_origin(hint) is tuple:
        element = typing.get_args(hint)[0]
        return tuple, (typing.get_args(element) if typing.get_origin(element) is Literal else None), optional
    if typing.get_origin(hint) is Literal:
        return str, typing.get_args(hint), optional
    return hint, None, optional


def _coerce_subsets(value):
    """A list of `Subset`s from YAML mappings, each setting checked like the top-level key of the same name
    (`image_dir` like `train_data_dir`)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, dict) for item in value):
        return None, f"subsets: expected a list of mappings (each with image_dir), got {value!r}."
    subsets, errors = [], []
    for index, item in enumerate(value, start=1):
        settings = {}
        for key, setting in item.items():
            converted, error = _coerce_subset_setting(key, setting)
            if error:
                errors.append(f"subsets[{index}].{error}")
            settings[key] = converted
        if not settings.get("image_dir"):
            errors.append(f"subsets[{index}]: image_dir is required (the folder of this subset's images).")
        elif not errors:
            subsets.append(Subset(**settings, source=f"subsets[{index}].image_dir"))
    return (None, "; ".join(errors)) if errors else (tuple(subsets), None)


def _coerce_subset_setting(key, value):
    """(value, None) or (None, error without the `subsets[i].` prefix) for one setting of a subset."""
    if key not in SUBSET_KEYS:
        close = difflib.get_close_matches(str(key), SUBSET_KEYS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return None, f"{key}: unknown key.{hint} Keys: {', '.join(SUBSET_KEYS)}."
    if key == "is_reg":  # subset-only: no top-level field to borrow the type from
        return (value, None) if isinstance(value, bool) else (None, f"is_reg: expected true or false, got {value!r}.")
    name = "train_data_dir" if key == "image_dir" else key
    converted, error = _coerce(name, value)
    error = error or _check_range(name, converted)
    return (None, error.replace(name, key, 1)) if error else (converted, None)


def _coerce_list(name: str, value, choices: tuple | None):
    if choices is None:  # a list of free text: one string is one item (prompts contain commas)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
            return None, f"{name}: expected a list of text items, got {value!r}."
        return tuple(items), None
    items = [item.strip() for item in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        return None, f"{name}: expected a list such as [{', '.join(choices)}], got {value!r}."
    wrong = [item for item in items if item not in choices]
    if wrong:
        return None, f"{name}: {wrong[0]!r} is not one of {', '.join(map(repr, choices))}."
    return tuple(dict.fromkeys(items)), None


def _coerce(name: str, value):
    """Converts a YAML value to the field's type, or returns an error message."""
    if name == "subsets":
        return _coerce_subsets(value)
    base, choices, optional = _expected_type(name)
    if value is None:
        return (None, None) if optional else (None, f"{name}: a value is required (got null).")
    if base is tuple:
        return _coerce_list(name, value, choices)
    if choices is not None:
        if value in choices:
            return value, None
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return None, f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}"
    if base is bool:
        if isinstance(value, bool):
            return value, None
        return None, f"{name}: expected true or false, got {value!r}."
    if base is int:
        number = _as_number(value)
        if number is not None and float(number).is_integer() and not isinstance(value, bool):
            return int(number), None
        return None, f"{name}: expected a whole number, got {value!r}."
    if base is float:
        number = _as_number(value)
        if number is not None and math.isfinite(number):
            return float(number), None
        return None, f"{name}: expected a number (e.g. 1e-4 or 0.0001), got {value!r}."
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value), None
    return None, f"{name}: expected text, got {value!r}."


def _as_number(value) -> float | None:
    # YAML 1.1 reads `2e-4` (no dot) as a string; it still means 0.0002.
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _check_range(name: str, value) -> str | None:
    spec = FIELDS[name].metadata
    if value is None:
        return None
    if spec["ge"] is not None and value < spec["ge"]:
        return f"{name}: must be at least {spec['ge']:g}, got {value!r}."
    if spec["gt"] is not None and value <= spec["gt"]:
        return f"{name}: must be greater than {spec['gt']:g}, got {value!r}."
    if spec["le"] is not None and value > spec["le"]:
        return f"{name}: must be at most {spec['le']}, got {value!r}."
    return None


def _canonical_keys(raw: dict, errors: list[str]) -> dict:
    """Maps aliases to field names; unknown keys become errors with the closest valid key."""
    resolved: dict = {}
    candidates = list(FIELDS) + list(ALIASES)
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if key in RENAMED_FLAGS:
            errors.append(f"{key}: not a key here; use {RENAMED_FLAGS[key]}.")
            continue
        if name not in FIELDS:
            close = difflib.get_close_matches(str(key), candidates, n=1, cutoff=0.6)
            hint = f" Did you mean {ALIASES.get(close[0], close[0])!r}?" if close else ""
            errors.append(f"{key}: unknown key.{hint}")
            continue
        if name in resolved:
            errors.append(f"{key}: sets {name!r}, which is already set (by {resolved[name][0]!r}); keep one.")
            continue
        resolved[name] = (key, value)
    return resolved


def parse_config(raw: dict, source: str = "config") -> TrainConfig:
    """Builds a TrainConfig from a mapping of YAML values, checking types, ranges and cross-field rules.

    Args:
        raw: Key/value pairs as read from YAML (field names or their kohya/diffusers aliases).
        source: What to call the config in messages (usually the file name).

    Returns:
        The validated config. Paths are not checked here; see `check_paths`.

    Raises:
        ConfigError: With every problem found.
    """
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"expected a mapping of key: value pairs, got {type(raw).__name__}."], source)
    values = {}
    for name, (key, value) in _canonical_keys(raw, errors).items():
        converted, error = _coerce(name, value)
        error = error or _check_range(name, converted)
        if error:
            errors.append(error if key == name else f"{error} (given as {key!r})")
        else:
            values[name] = converted
    for name in _REQUIRED:
        if values.get(name) is None and not any(e.startswith(f"{name}:") for e in errors):
            errors.append(f"{name}: required. {FIELDS[name].metadata['doc']}")
    if (
        not values.get("train_data_dir")
        and not values.get("subsets")
        and not any(e.startswith("subsets") for e in errors)
    ):
        errors.append(f"train_data_dir: required (or `subsets`). {FIELDS['train_data_dir'].metadata['doc']}")
    config = TrainConfig(**values)
    errors += _cross_field_errors(config, {name for name, value in values.items() if value is not None})
    if errors:
        raise ConfigError(errors, source)
    return _resolve_defaults(config)


_TI_ONLY = {"placeholder_token", "init_word", "num_vectors", "learnable_property"}
_JOINT_ONLY = {"embedding_lr", "embedding_train_fraction"}
_LORA_ONLY = {
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "conv_rank",
    "conv_alpha",
    "train_unet",
    "train_text_encoder",
    "network_weights",
    "unet_lr",
    "text_encoder_lr",
    "save_precision",
    "export_formats",
    "prior_preservation_prompts",
    "prior_loss_weight",
}


def _method_key_errors(config: TrainConfig, given: set[str]) -> list[str]:
    """Keys the chosen method would ignore are errors, not silently dropped settings."""
    unused = set()
    if not config.uses_ti:
        unused |= _TI_ONLY
    if config.method != "ti+lora":
        unused |= _JOINT_ONLY
    if not config.uses_lora:
        unused |= _LORA_ONLY
    users = {name: "'ti' or 'ti+lora'" for name in _TI_ONLY}
    users.update({name: "'ti+lora'" for name in _JOINT_ONLY})
    users.update({name: "'lora' or 'ti+lora'" for name in _LORA_ONLY})
    return [
        f"{name}: only used with method {users[name]} (method is {config.method!r}); remove it."
        for name in sorted(given & unused)
    ]


def _cross_field_errors(config: TrainConfig, given: set[str]) -> list[str]:
    """Settings that contradict each other, or that have no effect with the others (`given`: the keys set)."""
    errors = _method_key_errors(config, given) + _method_errors(config, given) + _data_errors(config)
    if not config.min_timestep < config.max_timestep <= 1000:
        errors.append(
            f"min_timestep, max_timestep: need 0 <= min < max <= 1000 (the training schedule's length), got "
            f"{config.min_timestep} and {config.max_timestep}."
        )
    if config.output_name and re.search(r"[\\/:*?\"<>|]", config.output_name):
        errors.append(f"output_name: {config.output_name!r} contains characters not allowed in file names.")
    if not config.sample_prompts:
        for name in sorted(given & {"sample_every_n_steps", "sample_steps", "sample_guidance_scale"}):
            errors.append(f"{name}: has no effect without sample_prompts; add prompts or remove it.")
    if config.overwrite and config.resume:
        errors.append(
            "overwrite, resume: resume continues the run in output_dir and overwrite deletes it; keep one of them."
        )
    if "lr_warmup_steps" in given and config.lr_warmup_steps and config.lr_scheduler == "constant":
        errors.append("lr_warmup_steps: has no effect with lr_scheduler 'constant'; use 'constant_with_warmup'.")
    return errors


def _method_errors(config: TrainConfig, given: set[str]) -> list[str]:
    """What TI, LoRA and prior preservation need of each other."""
    errors = []
    if config.uses_ti:
        for name in ("placeholder_token", "init_word"):
            if not (getattr(config, name) or "").strip():
                errors.append(f"{name}: required for method {config.method!r}. {FIELDS[name].metadata['doc']}")
        if config.placeholder_token and re.search(r"\s", config.placeholder_token):
            errors.append(
                f"placeholder_token: {config.placeholder_token!r} contains spaces; use one word like <mychar>."
            )
    if config.uses_lora and config.train_unet is False and config.train_text_encoder is False:
        errors.append("train_unet, train_text_encoder: both false leaves no LoRA to train; set one to true.")
    if "prior_loss_weight" in given and not (config.prior_preservation_prompts or config.uses_reg_images):
        errors.append(
            "prior_loss_weight: has no effect without prior_preservation_prompts or regularization images "
            "(reg_data_dir, or subsets with is_reg: true); add one or remove it."
        )
    if config.placeholder_token and any(config.placeholder_token in p for p in config.prior_preservation_prompts):
        errors.append(
            f"prior_preservation_prompts: they must describe what stays unchanged, but one contains the placeholder "
            f"{config.placeholder_token!r}; use the class instead (e.g. 'a photo of a dog')."
        )
    if config.conv_alpha is not None and config.conv_rank is None:
        errors.append("conv_alpha: has no effect without conv_rank; set conv_rank to train LoCon convs.")
    if config.method == "ti+lora" and config.output_name and config.output_name == config.embedding_name:
        errors.append(
            f"output_name: {config.output_name!r} is also the embedding's file stem (from placeholder_token); "
            "the LoRA and the embedding need different names."
        )
    return errors


def _data_errors(config: TrainConfig) -> list[str]:
    """Folders, buckets, caches and resolution that do not go together."""
    errors = []
    if config.subsets and all(subset.is_reg for subset in config.subsets):
        errors.append("subsets: every subset has is_reg: true; add at least one subset of training images.")
    if config.subsets and config.train_data_dir:
        errors.append("train_data_dir, subsets: give one; each subset names its own image_dir.")
    if config.enable_bucket and config.resolution is not None:  # else checked once the family's size is known
        errors += _bucket_errors(_bucket_defaults(config))
    errors += _cache_errors(config)
    if config.resolution is not None and config.resolution % 8:
        errors.append(f"resolution: must be a multiple of 8 (the VAE downsamples by 8), got {config.resolution}.")
    return errors


def _cache_errors(config: TrainConfig) -> list[str]:
    errors = []
    if config.cache_latents and not config.center_crop:
        errors.append("cache_latents: needs center_crop: true (a random crop differs every epoch, a cache cannot).")
    if config.cache_latents_to_disk and not config.cache_latents:
        errors.append("cache_latents_to_disk: has no effect without cache_latents: true; set both.")
    if config.cache_text_encoder_outputs and (
        config.shuffle_caption or any(s.shuffle_caption for s in config.subsets)
    ):
        errors.append(
            "cache_text_encoder_outputs: shuffle_caption makes a new caption at every use, which a cache of encoded "
            "captions cannot serve (kohya refuses the pair too); remove one of them."
        )
    text_trains = config.uses_ti or (config.uses_lora and config.train_text_encoder is not False)
    if config.cache_text_encoder_outputs and text_trains:
        errors.append(
            "cache_text_encoder_outputs: the text path trains (TI vectors or a text-encoder LoRA), so its outputs "
            "change every step; set train_text_encoder: false (LoRA) or remove the cache setting."
        )
    return errors


def _bucket_errors(config: TrainConfig) -> list[str]:
    """Bucket settings that cannot work with the resolution, each with the value to set (`config`: defaults filled)."""
    step, resolution = config.bucket_reso_steps, config.resolution
    if step % 8:
        return [f"bucket_reso_steps: must be a multiple of 8 (the VAE downsamples by 8), got {step}."]
    errors = []
    fitting = step if step <= resolution else max(8, resolution // 4 // 8 * 8)  # the step the suggestions use
    if step > resolution:
        errors.append(
            f"bucket_reso_steps: {step} is larger than resolution {resolution}, so no bucket fits; set "
            f"bucket_reso_steps: {max(8, resolution // 4 // 8 * 8)} or leave it unset."
        )
    if config.min_bucket_reso > resolution:
        errors.append(
            f"min_bucket_reso: {config.min_bucket_reso} is above resolution {resolution}; set min_bucket_reso: "
            f"{max(fitting, resolution // 2 // fitting * fitting)} (half the resolution) or leave it unset."
        )
    if config.max_bucket_reso < resolution:
        errors.append(
            f"max_bucket_reso: {config.max_bucket_reso} is below resolution {resolution}; set max_bucket_reso: "
            f"{-(-resolution * 2 // fitting) * fitting} (twice the resolution) or leave it unset."
        )
    for name in ("min_bucket_reso", "max_bucket_reso"):
        value = getattr(config, name)
        if value % step:
            errors.append(
                f"{name}: {value} is not a multiple of bucket_reso_steps ({step}); set {value // step * step}."
            )
    return errors


def check_paths(config: TrainConfig) -> list[str]:
    """Problems with the files and folders a config names (cheap: nothing is loaded)."""
    errors = []
    base = Path(config.base_model)
    if not base.exists():
        errors.append(f"base_model: {base} does not exist.")
    elif base.is_file() and base.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth"):
        errors.append(f"base_model: {base} is not a .safetensors or .ckpt checkpoint (nor a diffusers folder).")
    if config.base_model_config and not (Path(config.base_model_config) / "model_index.json").is_file():
        errors.append(
            f"base_model_config: {config.base_model_config} is not a diffusers folder (no model_index.json)."
        )
    folders = [("train_data_dir", config.train_data_dir)] if config.train_data_dir else []
    folders += [(subset.source, subset.image_dir) for subset in config.subsets]
    errors += [f"{name}: {folder} is not a folder." for name, folder in folders if not Path(folder).is_dir()]
    metadata = [(f"subsets[{i}].metadata_path", s.metadata_path) for i, s in enumerate(config.subsets, 1)]
    errors += [f"{name}: {path} does not exist." for name, path in metadata if path and not Path(path).is_file()]
    if config.vae and not Path(config.vae).exists():
        errors.append(f"vae: {config.vae} does not exist.")
    if config.network_weights and not Path(config.network_weights).is_file():
        errors.append(f"network_weights: {config.network_weights} does not exist.")
    if config.metadata_path and not Path(config.metadata_path).is_file():
        errors.append(f"metadata_path: {config.metadata_path} does not exist.")
    for name in ("output_dir", "logging_dir"):
        problem = writable_folder_problem(getattr(config, name))
        errors += [f"{name}: {problem}"] if problem and getattr(config, name) else []
    return errors


def writable_folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into `folder` (created when missing): a file in its place or on its path, or
    no write permission where it would be created. None when it can."""
    path = Path(folder)
    if path.is_file():
        return f"{path} is a file; name a folder."
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{path} cannot be created: {existing} is a file, not a folder; name a folder elsewhere."
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path.absolute() else f" ({existing}, where it would be created)"
        return f"{path}: no permission to write there{where}; choose a folder you can write to."
    return None


def parse_overrides(overrides: list[str]) -> dict:
    """`key=value` strings (values read as YAML) to a mapping.

    Raises:
        ConfigError: An override without `=`.
    """
    parsed, errors = {}, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            errors.append(f"override {item!r}: expected key=value, e.g. learning_rate=1e-4.")
            continue
        try:
            parsed[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            errors.append(
                f"override {item!r}: the value is not valid YAML ({problem}); quote text (key='a, b'), write lists "
                "as [1, 2]."
            )
    if errors:
        raise ConfigError(errors, "command line")
    return parsed


def yaml_problem(path: str | Path, error: yaml.YAMLError, example: str) -> str:
    """A YAML file's parse error as one line for the user: `FILE:LINE:COLUMN: not valid YAML (what); fix` (a tag
    such as `!!python/object` is named as refused: sdtune reads YAML as plain data, nothing runs)."""
    mark = getattr(error, "problem_mark", None)
    place = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    hint = f"write plain YAML, e.g. {example}"
    if isinstance(error, yaml.constructor.ConstructorError):
        hint = "sdtune reads YAML as plain data: tags such as !!python/... are refused, nothing was run"
    return f"{place}: not valid YAML ({problem}); {hint}."


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Reads a YAML config, applies `key=value` overrides, and validates types, rules and paths.

    Raises:
        ConfigError: With every problem found, paths included.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path} does not exist."], str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError([f"not UTF-8 text (byte {error.start}); save the file as UTF-8."], str(path)) from error
    except yaml.YAMLError as error:
        raise ConfigError([yaml_problem(path, error, "`learning_rate: 1e-4`")], str(path)) from None
    if isinstance(raw, dict):
        raw.update(parse_overrides(list(overrides)))
    config = parse_config(raw, str(path))
    errors = check_paths(config)
    if errors:
        raise ConfigError(errors, str(path))
    return config


def config_reference() -> str:
    """The config reference as Markdown (the table in docs/configuration.md)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        base, choices, optional = _expected_type(f.name)
        kind = " \\| ".join(choices) if choices else ("text" if base is tuple else base.__name__)
        kind = f"list of {kind}" if base is tuple else kind
        kind = "list of mappings" if f.name == "subsets" else kind
        default = "—" if f.default is None else f"`{list(f.default) if isinstance(f.default, tuple) else f.default}`"
        lines.append(f"| `{f.name}` | {kind}{' or null' if optional else ''} | {default} | {f.metadata['doc']} |")
    aliases = ", ".join(f"`{alias}` → `{name}`" for alias, name in ALIASES.items())
    return "\n".join(lines) + f"\n\nAccepted aliases (kohya sd-scripts / diffusers names): {aliases}.\n"


def to_dict(config: TrainConfig) -> dict:
    """The config as plain data (for logs and metadata)."""
    return dataclasses.asdict(config)
