"""Base models: detect the family, load from a diffusers folder or a single-file checkpoint, write small ones.

Everything here works offline: the configs that diffusers needs to read a single-file checkpoint ship inside the
package (`sdtune/base_configs/<family>/`), and the CLIP tokenizer is rebuilt from the BPE data that `open_clip_torch`
ships (see `shared/OFFLINE.md`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune import ldm_layout

FAMILY_NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "SDXL base",
    "sdxl_refiner": "SDXL refiner",
    "sd3": "Stable Diffusion 3.x",
    "flux": "FLUX",
}
SUPPORTED_FAMILIES = ("sd1",)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
EMBEDDED_CONFIG_KEY = "sdtune.diffusers_config"
_TOKENIZER_FILES = ("vocab.json", "merges.txt")


class ModelError(Exception):
    """A base model that sdtune cannot load: wrong kind of file, unsupported family, mismatching config."""


@dataclass
class BaseModel:
    """The components of a loaded Stable Diffusion base model and where they came from."""

    family: str
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    source: Path
    name: str

    @property
    def prediction_type(self) -> str:
        """`epsilon` or `v_prediction`, as the scheduler config says."""
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def text_width(self) -> int:
        """Width of the text encoder's token embeddings (768 for SD1.x)."""
        return self.text_encoder.get_input_embeddings().weight.shape[1]


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device, clip_skip: int = 1) -> torch.Tensor:
    """Text-encoder states for the UNet: the last layer's (clip_skip 1), or with kohya/A1111's `clip_skip` N the N-th
    layer from the end through the final layer norm. (diffusers' own `clip_skip`, which counts one less, reads
    `text_encoder.text_model`, a level transformers 5 no longer has, so sdtune computes it here.)"""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    if clip_skip == 1:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    model = getattr(text_encoder, "module", text_encoder)  # unwrapped from multi-process wrappers
    return getattr(model, "text_model", model).final_layer_norm(hidden)


def cache_dir() -> Path:
    """sdtune's cache folder: `$SDTUNE_CACHE_DIR`, else `~/.cache/sdtune`. Everything in it can be deleted."""
    path = Path(os.environ.get("SDTUNE_CACHE_DIR") or Path.home() / ".cache" / "sdtune")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomic_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def clip_tokenizer_dir() -> Path:
    """Writes (once) and returns a folder with CLIP's `vocab.json` and `merges.txt`, built from open_clip's BPE file.

    The vocabulary in id order is: the 256 byte characters, the same with `</w>`, one entry per merge, then
    `<|startoftext|>` (49406) and `<|endoftext|>` (49407), which is exactly OpenAI CLIP's tokenizer.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = cache_dir() / "clip_tokenizer"
    if all((folder / name).is_file() for name in _TOKENIZER_FILES):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header; 48,894 merges follow
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    _write_atomic_text(folder / "vocab.json", json.dumps({token: i for i, token in enumerate(vocab)}))
    _write_atomic_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def build_clip_tokenizer():
    """The SD1.x CLIP tokenizer (pads with `<|endoftext|>`), built offline."""
    from transformers import CLIPTokenizer

    folder = clip_tokenizer_dir()
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary and padding token: equal fingerprints tokenize identically."""
    payload = json.dumps({"vocab": tokenizer.get_vocab(), "pad": tokenizer.pad_token}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints and detecting the family


def read_checkpoint_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor names and shapes of a single-file checkpoint, plus its safetensors metadata, without loading weights.

    Raises:
        ModelError: The file cannot be read as a checkpoint (legacy pickles are read with `weights_only=True`).
    """
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
                return shapes, dict(handle.metadata() or {})
        except Exception as error:  # safetensors raises several error types for damaged files
            raise ModelError(f"base_model: {path} is not a readable .safetensors file ({error}).") from error
    state_dict = load_legacy_checkpoint(path)
    return {key: tuple(value.shape) for key, value in state_dict.items() if hasattr(value, "shape")}, {}


def load_legacy_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Loads a `.ckpt`/`.pt` state dict with `torch.load(weights_only=True)`, so no code in the file runs."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelError(
            f"base_model: {path} could not be loaded safely ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "sdtune reads legacy pickles only with torch.load(weights_only=True), which refuses files holding "
            "arbitrary Python objects. Use the .safetensors release of this model, or convert it on a machine "
            "where you trust the file."
        ) from error
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelError(f"base_model: {path} holds a {type(data).__name__}, not a state dict of tensors.")
    return data


def _has_prefix(keys, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def detect_family_from_keys(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    """Names the model family of an original-layout checkpoint from its keys and shapes.

    Raises:
        ModelError: The file is not a Stable Diffusion base model (a LoRA, an embedding, a VAE, ...).
    """
    keys = shapes.keys()
    if _has_prefix(keys, "lora_") or any(".lora_down." in key or ".lora_A." in key for key in keys):
        raise ModelError(f"base_model: {path} is a LoRA file, not a base model. Point base_model at a checkpoint.")
    if "emb_params" in keys or "string_to_param" in keys or "clip_l" in keys:
        raise ModelError(f"base_model: {path} is a textual inversion embedding, not a base model.")
    if _has_prefix(keys, "model.diffusion_model.joint_blocks.") or _has_prefix(keys, "joint_blocks."):
        return "sd3"
    if _has_prefix(keys, "model.diffusion_model.double_blocks.") or _has_prefix(keys, "double_blocks."):
        return "flux"
    if _has_prefix(keys, "conditioner.embedders.1."):
        return "sdxl"
    if _has_prefix(keys, "conditioner.embedders.0.model."):
        return "sdxl_refiner"
    if _has_prefix(keys, "model.diffusion_model."):
        if _has_prefix(keys, "cond_stage_model.model."):
            return "sd2"
        if _has_prefix(keys, ldm_layout.TEXT_ENCODER_PREFIX):
            return _check_plain_unet(shapes, path, "sd1")
        raise ModelError(
            f"base_model: {path} has a Stable Diffusion UNet but no text encoder sdtune recognises "
            "(expected cond_stage_model.transformer.text_model.* for SD1.x)."
        )
    if _has_prefix(keys, "encoder.down.") or _has_prefix(keys, "decoder.up."):
        raise ModelError(f"base_model: {path} is a VAE, not a full base model.")
    if _has_prefix(keys, "down_blocks.") or _has_prefix(keys, "conv_in."):
        raise ModelError(
            f"base_model: {path} holds one diffusers component, not a whole model; "
            "point base_model at the diffusers folder (the one with model_index.json) instead."
        )
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise ModelError(f"base_model: {path} is not a Stable Diffusion checkpoint sdtune recognises (keys: {sample}).")


def _check_plain_unet(shapes: dict[str, tuple[int, ...]], path: Path, family: str) -> str:
    in_channels = shapes.get("model.diffusion_model.input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(in_channels, f"a {in_channels}-channel")
        raise ModelError(
            f"base_model: {path} is {kind} {FAMILY_NAMES[family]} model (UNet input channels {in_channels}); "
            "sdtune trains on text-to-image models with 4 latent input channels."
        )
    return family


def detect_family_from_folder(path: Path) -> str:
    """Names the model family of a diffusers folder from `model_index.json` and the component configs.

    Raises:
        ModelError: The folder is not a diffusers pipeline sdtune recognises.
    """
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelError(
            f"base_model: {path} is a folder without model_index.json, so not a diffusers model folder. "
            "Point base_model at a diffusers folder or a single .safetensors checkpoint."
        )
    pipeline_class = json.loads(index_path.read_text(encoding="utf-8")).get("_class_name", "")
    if pipeline_class.startswith("StableDiffusionXL"):
        return "sdxl"
    if pipeline_class.startswith("StableDiffusion3"):
        return "sd3"
    if pipeline_class.startswith("Flux"):
        return "flux"
    if pipeline_class != "StableDiffusionPipeline":
        raise ModelError(f"base_model: {path} is a {pipeline_class or 'unknown'} pipeline, not Stable Diffusion.")
    text_config = json.loads((path / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    # SD2.x's OpenCLIP-H text encoder is stored as a CLIPTextModel too; it is the one with plain GELU (and width 1024).
    if text_config.get("hidden_act") == "gelu" or text_config.get("hidden_size") == 1024:
        return "sd2"
    return "sd1"


def require_supported(family: str, path: Path) -> None:
    """Raises ModelError naming the family when sdtune cannot train on it yet."""
    if family not in SUPPORTED_FAMILIES:
        supported = ", ".join(FAMILY_NAMES[name] for name in SUPPORTED_FAMILIES)
        raise ModelError(
            f"base_model: {path} is a {FAMILY_NAMES.get(family, family)} model, which this version of sdtune does not "
            f"support yet (supported: {supported})."
        )


def detect_family(path: Path) -> str:
    """Family of the base model at `path` (a diffusers folder or a single-file checkpoint)."""
    if path.is_dir():
        return detect_family_from_folder(path)
    return detect_family_from_keys(read_checkpoint_header(path)[0], path)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_base_model(path: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> BaseModel:
    """Loads an SD base model from a diffusers folder or a single-file checkpoint, fully offline, in float32.

    Args:
        path: A diffusers folder (with `model_index.json`) or a `.safetensors` / `.ckpt` checkpoint in the original
            layout.
        config_dir: For single files only: a diffusers folder whose configs describe the checkpoint. Default: the
            config sdtune recorded in its own checkpoints, else the standard config sdtune ships for the family.

    Returns:
        The components in float32 on the CPU, in eval mode, with gradients disabled.

    Raises:
        ModelError: Unknown or unsupported model, or a checkpoint that does not match its config.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"base_model: {path} does not exist.")
    if path.is_dir():
        family = detect_family_from_folder(path)
        require_supported(family, path)
        components = _load_folder_components(path)
    else:
        shapes, metadata = read_checkpoint_header(path)
        family = detect_family_from_keys(shapes, path)
        require_supported(family, path)
        folder = Path(config_dir) if config_dir else _config_dir_for(metadata, family)
        _check_config_matches(shapes, folder, path)
        components = _load_single_file_components(path, folder)
    for module in (components["text_encoder"], components["unet"], components["vae"]):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(family=family, source=path, name=path.stem if path.is_file() else path.name, **components)


def _load_folder_components(path: Path) -> dict:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text(encoding="utf-8"))
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), diffusers.DDPMScheduler)
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
        # float32 whatever the files hold (fp16 releases are common): training keeps full-precision weights.
        "text_encoder": CLIPTextModel.from_pretrained(
            path / "text_encoder", local_files_only=True, dtype=torch.float32
        ),
        "unet": UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True, torch_dtype=torch.float32),
        "vae": AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, torch_dtype=torch.float32),
        "scheduler_config": dict(scheduler_class.from_config(scheduler_config).config),
    }


def _load_single_file_components(path: Path, config_folder: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(config_folder),
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        torch_dtype=torch.float32,
    )
    return {
        "tokenizer": pipeline.tokenizer,
        "text_encoder": pipeline.text_encoder,
        "unet": pipeline.unet,
        "vae": pipeline.vae,
        "scheduler_config": dict(pipeline.scheduler.config),
    }


def _config_dir_for(metadata: dict[str, str], family: str) -> Path:
    """A diffusers config folder (configs + tokenizer, no weights) for a single-file checkpoint, built in the cache."""
    if EMBEDDED_CONFIG_KEY in metadata:
        configs = json.loads(metadata[EMBEDDED_CONFIG_KEY])
    else:
        configs = _shipped_configs(family)
    digest = hashlib.sha256(json.dumps(configs, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    folder = cache_dir() / "configs" / f"{family}-{digest}"
    if not (folder / "model_index.json").is_file():
        _write_config_folder(folder, configs)
    return folder


def _shipped_configs(family: str) -> dict:
    root = resources.files("sdtune") / "base_configs" / family
    configs = {"model_index": json.loads((root / "model_index.json").read_text(encoding="utf-8"))}
    for component, file_name in _CONFIG_FILES.items():
        configs[component] = json.loads((root / component / file_name).read_text(encoding="utf-8"))
    return configs


_CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}


def _write_config_folder(folder: Path, configs: dict) -> None:
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for component, file_name in _CONFIG_FILES.items():
        (staging / component).mkdir(parents=True)
        (staging / component / file_name).write_text(json.dumps(configs[component], indent=2), encoding="utf-8")
    (staging / "model_index.json").write_text(json.dumps(configs["model_index"], indent=2), encoding="utf-8")
    build_clip_tokenizer().save_pretrained(staging / "tokenizer")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def _check_config_matches(shapes: dict[str, tuple[int, ...]], folder: Path, path: Path) -> None:
    """Compares a checkpoint's widths with its config, so a mismatch gets a clear message instead of a shape error."""
    unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    text = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    found = {
        "UNet width": shapes.get(ldm_layout.UNET_PREFIX + "input_blocks.0.0.weight", (None,))[0],
        "cross-attention width": next(
            (shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None
        ),
        "text encoder width": shapes.get(
            ldm_layout.TEXT_ENCODER_PREFIX + "embeddings.token_embedding.weight", (None, None)
        )[1],
        "text encoder layers": len(
            {m.group(1) for key in shapes if (m := re.search(r"text_model\.encoder\.layers\.(\d+)\.", key))}
        ),
    }
    expected = {
        "UNet width": unet["block_out_channels"][0],
        "cross-attention width": unet["cross_attention_dim"],
        "text encoder width": text["hidden_size"],
        "text encoder layers": text["num_hidden_layers"],
    }
    mismatches = [
        f"{name} {found[name]} (config: {expected[name]})" for name in expected if found[name] != expected[name]
    ]
    if mismatches:
        raise ModelError(
            f"base_model: {path} does not match the config in {folder}: {'; '.join(mismatches)}. "
            "Set base_model_config to a diffusers folder holding this model's configs."
        )


def load_tokenizer(path: str | os.PathLike, config_dir: str | os.PathLike | None = None):
    """The base model's tokenizer alone (cheap: no weights load), after checking that the family is supported.

    Raises:
        ModelError: Missing path, unknown or unsupported model.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    if not path.exists():
        raise ModelError(f"base_model: {path} does not exist.")
    if path.is_dir():
        require_supported(detect_family_from_folder(path), path)
        return CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    shapes, metadata = read_checkpoint_header(path)
    family = detect_family_from_keys(shapes, path)
    require_supported(family, path)
    folder = Path(config_dir) if config_dir else _config_dir_for(metadata, family)
    return CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Hashing


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (what A1111 shows as a checkpoint's hash, shortened to 10 characters)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_model_sha256(path: Path) -> str:
    """sha256 of a single-file checkpoint, or of a diffusers folder's files (relative paths and contents, sorted).

    Results are cached in `cache_dir()/hashes.json` by path, size and modification time, as A1111 does.
    """
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = [
        [str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns] for p in files
    ]
    cache_file = cache_dir() / "hashes.json"
    cache = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}
    entry = cache.get(str(path))
    if entry and entry["stamp"] == stamp:
        return entry["sha256"]
    if path.is_file():
        value = file_sha256(path)
    else:
        digest = hashlib.sha256()
        for file, (relative, _, _) in zip(files, stamp, strict=True):
            digest.update(f"{relative}\0{file_sha256(file)}\n".encode())
        value = digest.hexdigest()
    cache[str(path)] = {"stamp": stamp, "sha256": value}
    _write_atomic_text(cache_file, json.dumps(cache, indent=1))
    return value


# ---------------------------------------------------------------------------------------------------------------
# Writing base models (tiny ones for tests and the quickstart; SD1.5-shaped ones for real-size checks)

TINY_CONFIGS = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [32, 32, 64, 64],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "hidden_act": "quick_gelu",
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "layer_norm_eps": 1e-05,
    },
}
PRESETS = ("tiny", "sd15")


def preset_configs(preset: str) -> dict:
    """The component configs of a base-model preset: `tiny` (about 2 M parameters) or `sd15` (SD1.5's shapes)."""
    if preset not in PRESETS:
        raise ModelError(f"preset {preset!r} is not one of {', '.join(PRESETS)}.")
    configs = _shipped_configs("sd1")
    if preset == "tiny":
        configs.update(json.loads(json.dumps(TINY_CONFIGS)))
    return configs


def build_components(preset: str = "tiny", seed: int = 0) -> dict:
    """Random-weight SD1-family components (tokenizer, text encoder, UNet, VAE, scheduler config) for a preset."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = preset_configs(preset)
    torch.manual_seed(seed)
    text_config = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    return {
        "tokenizer": build_clip_tokenizer(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text_config)),
        "unet": UNet2DConditionModel.from_config(configs["unet"]),
        "vae": AutoencoderKL.from_config(configs["vae"]),
        "scheduler_config": configs["scheduler"],
        "configs": configs,
    }


def write_base_model(
    folder: str | os.PathLike | None,
    checkpoint: str | os.PathLike | None = None,
    preset: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Writes a random-weight SD1-family base model as a diffusers folder and/or a single-file checkpoint.

    Args:
        folder: Where to write the diffusers folder (None: do not write one).
        checkpoint: Where to write the original-layout `.safetensors` checkpoint (None: do not write one).
        preset: `tiny` or `sd15` (see `preset_configs`).
        seed: Seed for the random weights; equal seeds give equal files.
        dtype: Dtype of the weights in the checkpoint file.
    """
    components = build_components(preset, seed)
    # A checkpoint with SD1.5's shapes loads with the shipped config, like any real one; others carry theirs.
    save_base_model(components, folder, checkpoint, dtype=dtype, embed_config=preset != "sd15")


def save_base_model(
    components: dict,
    folder: str | os.PathLike | None,
    checkpoint: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    embed_config: bool = True,
) -> None:
    """Saves SD1-family components as a diffusers folder and/or an original-layout single-file checkpoint.

    Args:
        components: `tokenizer`, `text_encoder`, `unet`, `vae`, `scheduler_config`, and `configs` (the component
            configs as plain dicts, plus `model_index`).
        folder: Diffusers folder to write (None: none).
        checkpoint: `.safetensors` checkpoint to write (None: none).
        dtype: Dtype of the saved weights (both outputs).
        embed_config: Record the configs in the checkpoint's header, so it loads without a config folder.
    """
    if folder is not None:
        _write_folder(Path(folder), components, dtype)
    if checkpoint is not None:
        state_dict = {
            **ldm_layout.unet_to_ldm(components["unet"].state_dict(), components["configs"]["unet"]),
            **ldm_layout.vae_to_ldm(components["vae"].state_dict(), components["configs"]["vae"]),
            **ldm_layout.text_encoder_to_ldm(components["text_encoder"].state_dict()),
        }
        state_dict = {key: value.to(dtype).contiguous() for key, value in state_dict.items()}
        # default=str: configs of loaded models carry paths (`_name_or_path`), which JSON cannot hold as they are.
        metadata = {EMBEDDED_CONFIG_KEY: json.dumps(components["configs"], default=str)} if embed_config else {}
        path = Path(checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        save_file(state_dict, str(temporary), metadata=metadata)
        os.replace(temporary, path)


def _write_folder(folder: Path, components: dict, dtype: torch.dtype) -> None:
    import copy

    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("unet", "vae", "text_encoder"):
        module = components[name] if dtype == torch.float32 else copy.deepcopy(components[name]).to(dtype)
        module.save_pretrained(staging / name)
    components["tokenizer"].save_pretrained(staging / "tokenizer")
    (staging / "scheduler").mkdir()
    scheduler_text = json.dumps(components["scheduler_config"], indent=2)
    (staging / "scheduler" / "scheduler_config.json").write_text(scheduler_text, encoding="utf-8")
    model_index = json.dumps(components["configs"]["model_index"], indent=2)
    (staging / "model_index.json").write_text(model_index, encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
