"""Base models: detect the family, load from a diffusers folder or a single-file checkpoint, write small ones.

Everything here works offline: the configs that diffusers needs to read a single-file checkpoint ship inside the
package (`sdtune/base_configs/<family>/`), and the CLIP tokenizer is rebuilt from the BPE data that `open_clip_torch`
ships (see `shared/OFFLINE.md`). What differs between families comes from their records in `sdtune.families`.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import inspect
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file as safe_load_file
from safetensors.torch import save_file

from sdtune import atomic, checkpoint_keys, families
from sdtune.config import ConfigError
from sdtune.errors import SdtuneError
from sdtune.families import LDM_UNET_KEYS, Family

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
EMBEDDED_CONFIG_KEY = "sdtune.diffusers_config"
MADE_BY_KEY = "_sdtune_make_base"  # model_index.json / checkpoint header: the preset of a `make-base` model
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
PREDICTION_TYPES = ("epsilon", "v_prediction")
logger = logging.getLogger(__name__)


class ModelError(SdtuneError):
    """A base model that sdtune cannot load: wrong kind of file, unsupported family, mismatching config."""


@dataclass
class BaseModel:
    """The components of a loaded Stable Diffusion base model, its family and where it came from.

    `tokenizers` and `text_encoders` are keyed by the family's pipeline attribute names (`tokenizer`,
    `text_encoder`; SDXL adds `tokenizer_2`, `text_encoder_2`), in the family's order.
    """

    family: Family
    tokenizers: dict[str, object]
    text_encoders: dict[str, torch.nn.Module]
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
    def tokenizer(self):
        """The first tokenizer (SD1.x has only this one)."""
        return self.tokenizers[self.family.text_encoders[0].tokenizer]

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The first text encoder (SD1.x has only this one)."""
        return self.text_encoders[self.family.text_encoders[0].component]

    @property
    def text_widths(self) -> tuple[int, ...]:
        """Widths of the text encoders' token embeddings, in the family's order (768 for SD1.x)."""
        return tuple(encoder.get_input_embeddings().weight.shape[1] for encoder in self.text_encoders.values())

    @property
    def text_width(self) -> int:
        """Width of the first text encoder's token embeddings (768 for SD1.x)."""
        return self.text_widths[0]

    @property
    def components(self) -> dict[str, object]:
        """Every component by its diffusers pipeline attribute name (what a pipeline is built from)."""
        return {**self.tokenizers, **self.text_encoders, "unet": self.unet, "vae": self.vae}

    def adaptable(self) -> dict[str, torch.nn.Module]:
        """The modules a LoRA can adapt, by component name: the UNet and every text encoder."""
        return {"unet": self.unet, **self.text_encoders}


@dataclass
class TextConditioning:
    """What the text encoders give the UNet for a batch of prompts."""

    states: torch.Tensor  # [batch, tokens, width]: the cross-attention context
    pooled: torch.Tensor | None = None  # [batch, projection]: the pooled embedding (SDXL's added conditioning)


_TOKEN_CACHE_LIMIT = 65536  # prompts whose token ids `token_ids` keeps (about 1 KB each)


def encode_text(family: Family, parts: Mapping, prompts: list[str], device, clip_skip: int = 1) -> TextConditioning:
    """The text conditioning of `prompts`: per text encoder of the family the hidden state it feeds the UNet
    (kohya/A1111's `clip_skip` N takes the layer N-1 earlier), concatenated along the width, and the pooled embedding
    of the encoder that has one.

    The pooled embedding is the projection of the final-LayerNorm state at the first end-of-text token (kohya's
    `_pool_workaround`; CLIP's own argmax pooling picks the highest token id, which an added placeholder token is).

    Args:
        family: The base model's family (which encoders, which layer, whether through the final LayerNorm).
        parts: Tokenizers and text encoders by pipeline attribute name (`BaseModel.components`, a pipeline's
            `components`, or a training run's wrapped encoders).
        prompts: The prompts, already expanded (placeholder tokens).
        device: Where the token ids go.
        clip_skip: 1 = the family's layer (SD1.x: the last one, through the final LayerNorm). diffusers' own
            `clip_skip` counts one less and reads `text_encoder.text_model`, a level transformers 5 no longer has,
            so sdtune computes it here.
    """
    return encode_ids(family, parts, token_ids(family, parts, prompts, device), clip_skip)


def token_ids(family: Family, parts: Mapping, prompts: list[str], device, cache: dict | None = None) -> dict:
    """Each text encoder's `[batch, 77]` token ids of `prompts` (padded, cut at the tokenizer's length), by component
    name: what `encode_ids` reads. With `cache` (prompt -> ids, kept by the caller) each distinct prompt is tokenized
    once: tokenizing is Python work a training step would otherwise repeat for every batch."""
    if cache is None:
        return {
            spec.component: parts[spec.tokenizer](
                prompts, padding="max_length", max_length=parts[spec.tokenizer].model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            for spec in family.text_encoders
        }  # fmt: skip
    missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in cache]
    if missing:
        if len(cache) + len(missing) > _TOKEN_CACHE_LIMIT:  # shuffled captions are new strings every time
            cache.clear()
        fresh = token_ids(family, parts, missing, device)
        cache.update({prompt: {name: ids[i] for name, ids in fresh.items()} for i, prompt in enumerate(missing)})
    return {spec.component: torch.stack([cache[p][spec.component] for p in prompts]) for spec in family.text_encoders}


def encode_ids(
    family: Family, parts: Mapping, ids: Mapping[str, torch.Tensor], clip_skip: int = 1
) -> TextConditioning:
    """The text conditioning of token ids (`token_ids`); see `encode_text`."""
    states, pooled = [], None
    for spec in family.text_encoders:
        encoder, component_ids = parts[spec.component], ids[spec.component]
        output = encoder(component_ids, output_hidden_states=True)
        model = getattr(encoder, "module", encoder)  # unwrapped from multi-process wrappers
        layer = spec.hidden_layer - (clip_skip - 1)
        if layer == -1 and spec.final_layer_norm:
            states.append(output.last_hidden_state)  # the last layer through the final LayerNorm
        elif spec.final_layer_norm:
            states.append(getattr(model, "text_model", model).final_layer_norm(output.hidden_states[layer]))
        else:
            states.append(output.hidden_states[layer])
        if spec.pooled:
            first_end = (component_ids == parts[spec.tokenizer].eos_token_id).int().argmax(dim=-1)
            rows = torch.arange(len(component_ids), device=component_ids.device)
            pooled = model.text_projection(output.last_hidden_state[rows, first_end])
    return TextConditioning(states[0] if len(states) == 1 else torch.cat(states, dim=-1), pooled)


def encode_prompts(family: Family, parts: Mapping, prompts: list[str], device, clip_skip: int = 1) -> torch.Tensor:
    """The cross-attention context of `prompts` (see `encode_text`)."""
    return encode_text(family, parts, prompts, device, clip_skip).states


def added_conditioning(family: Family, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict:
    """The UNet's extra keyword arguments for a family with added conditioning (SDXL: the pooled text embedding and
    the time ids, `[batch, 6]` = original height, width, crop top, left, target height, width); none otherwise."""
    if not family.time_ids:
        return {}
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}}


def cache_dir() -> Path:
    """sdtune's cache folder: `$SDTUNE_CACHE_DIR`, else `~/.cache/sdtune`. Everything in it can be deleted."""
    path = Path(os.environ.get("SDTUNE_CACHE_DIR") or Path.home() / ".cache" / "sdtune")
    path.mkdir(parents=True, exist_ok=True)
    return path


def clip_tokenizer_dir() -> Path:
    """Writes (once) and returns a folder with CLIP's `vocab.json` and `merges.txt`, built from open_clip's BPE file.

    The vocabulary in id order is: the 256 byte characters, the same with `</w>`, one entry per merge, then
    `<|startoftext|>` (49406) and `<|endoftext|>` (49407), which is exactly OpenAI CLIP's tokenizer.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = cache_dir() / "clip_tokenizer"
    if all((folder / name).is_file() for name in _TOKENIZER_FILES):
        return folder
    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header; 48,894 merges follow
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    atomic.write_text(folder / "vocab.json", json.dumps({token: i for i, token in enumerate(vocab)}))
    atomic.write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def build_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The CLIP tokenizer, built offline, padding with `pad_token` (OpenAI CLIP's `<|endoftext|>`, or OpenCLIP's
    `!`: see the family's `TextEncoder.pad_token`)."""
    from transformers import CLIPTokenizer

    folder = clip_tokenizer_dir()
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token=pad_token
    )


def tokenizer_fingerprint(*tokenizers) -> str:
    """A short hash of the tokenizers' vocabularies and padding tokens: equal fingerprints tokenize identically."""
    prints = []
    for tokenizer in tokenizers:
        payload = json.dumps({"vocab": tokenizer.get_vocab(), "pad": tokenizer.pad_token}, sort_keys=True)
        prints.append(hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16])
    return prints[0] if len(prints) == 1 else hashlib.sha256(",".join(prints).encode()).hexdigest()[:16]


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


def _not_a_base_model(keys, path: Path) -> str | None:
    """What a file that is not a whole base model is (a LoRA, an embedding, a VAE, one diffusers component)."""
    if _has_prefix(keys, families.KOHYA_UNET_PREFIX) or any(".lora_down." in k or ".lora_A." in k for k in keys):
        return f"base_model: {path} is a LoRA file, not a base model. Point base_model at a checkpoint."
    if any(key in keys for key in (*families.embedding_keys(), "string_to_param")):
        return f"base_model: {path} is a textual inversion embedding, not a base model."
    if _has_prefix(keys, "encoder.down.") or _has_prefix(keys, "decoder.up."):
        return f"base_model: {path} is a VAE, not a full base model."
    if _has_prefix(keys, "down_blocks.") or _has_prefix(keys, "conv_in."):
        return (
            f"base_model: {path} holds one diffusers component, not a whole model; "
            "point base_model at the diffusers folder (the one with model_index.json) instead."
        )
    return None


def detect_family_from_keys(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    """Names the model family of an original-layout checkpoint from its keys and shapes.

    Raises:
        ModelError: The file is not a Stable Diffusion base model (a LoRA, an embedding, a VAE, ...).
    """
    keys = list(shapes)
    signature = families.from_checkpoint_keys(keys)
    if signature is None:
        problem = _not_a_base_model(keys, path)
        if problem:
            raise ModelError(problem)
    if signature is None and _has_prefix(keys, checkpoint_keys.UNET_PREFIX):
        expected = "; ".join(
            f"{family.text_encoders[0].checkpoint_prefix}* for {family.title}" for family in families.FAMILIES.values()
        )
        raise ModelError(
            f"base_model: {path} has a Stable Diffusion UNet but no text encoder sdtune recognises "
            f"(expected {expected})."
        )
    if signature is None:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise ModelError(
            f"base_model: {path} is not a Stable Diffusion checkpoint sdtune recognises (keys: {sample})."
        )
    if families.get(signature.name):
        _check_plain_unet(shapes, path, signature.title)
    return signature.name


def _check_plain_unet(shapes: dict[str, tuple[int, ...]], path: Path, title: str) -> None:
    in_channels = shapes.get(checkpoint_keys.UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(in_channels, f"a {in_channels}-channel")
        raise ModelError(
            f"base_model: {path} is {kind} {title} model (UNet input channels {in_channels}); "
            "sdtune trains on text-to-image models with 4 latent input channels."
        )


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
    text_config_path = path / "text_encoder" / "config.json"
    text_config = json.loads(text_config_path.read_text(encoding="utf-8")) if text_config_path.is_file() else None
    signature = families.from_pipeline(pipeline_class, text_config)
    if signature is None:
        raise ModelError(f"base_model: {path} is a {pipeline_class or 'unknown'} pipeline, not Stable Diffusion.")
    return signature.name


def require_supported(name: str, path: Path) -> Family:
    """The record of a family sdtune trains on.

    Raises:
        ModelError: Naming the family, when sdtune cannot train on it yet.
    """
    family = families.get(name)
    if family is None:
        raise ModelError(
            f"base_model: {path} is a {families.title(name)} model, which this version of sdtune does not "
            f"support yet (supported: {families.supported_titles()})."
        )
    return family


def detect_family(path: str | os.PathLike) -> str:
    """Family name (`sd1`, ...) of the base model at `path` (a diffusers folder or a single-file checkpoint)."""
    path = Path(path)
    if path.is_dir():
        return detect_family_from_folder(path)
    return detect_family_from_keys(read_checkpoint_header(path)[0], path)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_base_model(
    path: str | os.PathLike, config_dir: str | os.PathLike | None = None, prediction_type: str | None = None
) -> BaseModel:
    """Loads an SD base model from a diffusers folder or a single-file checkpoint, fully offline, in float32.

    Args:
        path: A diffusers folder (with `model_index.json`) or a `.safetensors` / `.ckpt` checkpoint in the original
            layout.
        config_dir: For single files only: a diffusers folder whose configs describe the checkpoint. Default: the
            config sdtune recorded in its own checkpoints, else the standard config sdtune ships for the family (for
            SD2.x: of the 512-base or the 768-v release, as `prediction_type_of` decides).
        prediction_type: `epsilon` or `v_prediction`, overriding what the model says (see `prediction_type_of`).

    Returns:
        The components in float32 on the CPU, in eval mode, with gradients disabled.

    Raises:
        ModelError: Unknown or unsupported model, or a checkpoint that does not match its config.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"base_model: {path} does not exist.")
    if path.is_dir():
        family = require_supported(detect_family_from_folder(path), path)
        predicts = prediction_type_of(path, prediction_type)
        components = _load_folder_components(path, family)
        schedule = {}
    else:
        shapes, metadata = read_checkpoint_header(path)
        family = require_supported(detect_family_from_keys(shapes, path), path)
        predicts = prediction_type_of(path, prediction_type, config_dir)
        folder = Path(config_dir) if config_dir else _config_dir_for(metadata, family, predicts)
        _check_config_matches(shapes, folder, path, family)
        components = _load_single_file_components(path, folder, family)
        schedule = _marked_schedule(shapes)
    schedule["prediction_type"] = predicts
    components["scheduler_config"] = with_schedule(components["scheduler_config"], schedule)
    for module in (*components["text_encoders"].values(), components["unet"], components["vae"]):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(family=family, source=path, name=path.stem if path.is_file() else path.name, **components)


def _load_folder_components(path: Path, family: Family) -> dict:
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text(encoding="utf-8"))
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), diffusers.DDPMScheduler)
    return {
        "tokenizers": {
            spec.tokenizer: transformers.CLIPTokenizer.from_pretrained(path / spec.tokenizer, local_files_only=True)
            for spec in family.text_encoders
        },
        # float32 whatever the files hold (fp16 releases are common): training keeps full-precision weights.
        "text_encoders": {
            spec.component: getattr(transformers, spec.model_class).from_pretrained(
                path / spec.component, local_files_only=True, dtype=torch.float32
            )
            for spec in family.text_encoders
        },
        "unet": UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True, torch_dtype=torch.float32),
        "vae": AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, torch_dtype=torch.float32),
        "scheduler_config": dict(scheduler_class.from_config(scheduler_config).config),
    }


def without_safety_checker(pipeline_class) -> dict:
    """The arguments that leave out a pipeline's safety checker, for the pipeline classes that have one."""
    accepted = inspect.signature(pipeline_class.__init__).parameters
    wanted = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {name: value for name, value in wanted.items() if name in accepted}


def _load_single_file_components(path: Path, config_folder: Path, family: Family) -> dict:
    import diffusers

    pipeline_class = getattr(diffusers, family.pipeline_class)
    options = without_safety_checker(pipeline_class)
    options.pop("requires_safety_checker", None)  # a constructor flag; from_single_file takes components only
    pipeline = pipeline_class.from_single_file(
        str(path), config=str(config_folder), local_files_only=True, torch_dtype=torch.float32, **options
    )
    return {
        "tokenizers": {spec.tokenizer: getattr(pipeline, spec.tokenizer) for spec in family.text_encoders},
        "text_encoders": {spec.component: getattr(pipeline, spec.component) for spec in family.text_encoders},
        "unet": pipeline.unet,
        "vae": pipeline.vae,
        "scheduler_config": dict(pipeline.scheduler.config),
    }


# Empty marker tensors some single files carry (NoobAI-XL V-Pred and its merges; written by ComfyUI, OneTrainer,
# SimpleTuner; read by A1111, ComfyUI, Forge): the model predicts v, its schedule has zero terminal SNR.
SCHEDULE_MARKERS = {"v_pred": {"prediction_type": "v_prediction"}, "ztsnr": {"rescale_betas_zero_snr": True}}


def with_schedule(scheduler_config: dict, settings: dict) -> dict:
    """A scheduler config with `settings` in force. (diffusers' `from_config` ignores keys listed in the config's
    `_use_default_values`, so a setting the original file lacked must leave that list too.)"""
    defaults = [key for key in scheduler_config.get("_use_default_values", []) if key not in settings]
    return {**scheduler_config, **settings, "_use_default_values": defaults}


def _marked_schedule(keys) -> dict:
    """Scheduler settings a single file's marker keys state (nothing without markers)."""
    return {name: value for key, setting in SCHEDULE_MARKERS.items() if key in keys for name, value in setting.items()}


# ---------------------------------------------------------------------------------------------------------------
# What the model predicts: said by the model (or what comes with it), overridden by the user, else probed


def prediction_type_of(
    path: str | os.PathLike, requested: str | None = None, config_dir: str | os.PathLike | None = None
) -> str:
    """Whether the base model at `path` predicts the noise (`epsilon`) or v (`v_prediction`).

    In order: `requested` (the config's `prediction_type`, generate's `--prediction-type`), else what the model
    says: a diffusers folder's scheduler config; for a single file, a `<checkpoint>.yaml` beside it (A1111's and
    Forge's convention: `model.params.parameterization: v`), its `v_pred` marker, the scheduler config of
    `config_dir` or the one sdtune recorded in its header. A file that says nothing is taken as its family's
    published model (epsilon) unless the family has a v-prediction release of the same shapes (SD2.x 768-v): then
    the UNet is probed as A1111 probes it (`probe_prediction_type`), with a warning that names the result and the
    ways to state it. A `requested` value that contradicts what the model says is used with a warning.

    Raises:
        ModelError: An unreadable yaml beside the file, or one stating a parameterization sdtune does not train.
    """
    path = Path(path)
    if requested:
        try:
            stated, source = _stated_prediction_type(path, config_dir)
        except ModelError as error:  # the user's setting decides; what it passes over is still said
            _warn_once(f"prediction_type: {requested} is used; {error}")
            stated, source = None, ""
        if stated and stated != requested:
            _warn_once(f"prediction_type: {requested} overrides {source}, which says {stated}")
        return requested
    stated, source = _stated_prediction_type(path, config_dir)
    if stated:
        return stated
    shapes, _ = read_checkpoint_header(path)
    family = require_supported(detect_family_from_keys(shapes, path), path)
    if not family.config_folder_v:
        return families.shipped_configs(family)["scheduler"]["prediction_type"]
    return _probed_prediction_type(path, family, config_dir)


def _stated_prediction_type(path: Path, config_dir) -> tuple[str | None, str]:
    """(what the model or the files that come with it say it predicts, where that is said); (None, "") if nothing."""
    if path.is_dir():
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(scheduler_file.read_text(encoding="utf-8")) if scheduler_file.is_file() else {}
        return scheduler.get("prediction_type", "epsilon"), str(scheduler_file)
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        return _yaml_prediction_type(beside), str(beside)
    shapes, metadata = read_checkpoint_header(path)
    if "v_pred" in shapes:
        return "v_prediction", f"the v_pred marker in {path.name}"
    if config_dir:
        scheduler_file = Path(config_dir) / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(scheduler_file.read_text(encoding="utf-8")) if scheduler_file.is_file() else {}
        if scheduler.get("prediction_type"):
            return scheduler["prediction_type"], str(scheduler_file)
    if EMBEDDED_CONFIG_KEY in metadata:
        scheduler = json.loads(metadata[EMBEDDED_CONFIG_KEY]).get("scheduler", {})
        if scheduler.get("prediction_type"):
            return scheduler["prediction_type"], f"the config recorded in {path.name}"
    return None, ""


def _yaml_prediction_type(path: Path) -> str:
    """The prediction type an LDM model yaml states: `model.params.parameterization` `v`, else epsilon (LDM's
    default, as in SD2's `v2-inference.yaml`)."""
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        value = (document.get("model") or {}).get("params", {}).get("parameterization", "eps")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as error:
        raise ModelError(
            f"{path}: could not be read as the model's yaml ({type(error).__name__}); sdtune reads "
            "model.params.parameterization from it. Fix or remove it, or set prediction_type in the config."
        ) from error
    if value not in ("v", "eps"):
        raise ModelError(
            f"{path}: model.params.parameterization is {value!r}; sdtune trains eps (epsilon) and v (v_prediction) "
            "models. Fix the yaml, or set prediction_type in the config."
        )
    return "v_prediction" if value == "v" else "epsilon"


_PROBED: dict[tuple, str] = {}  # (file, size, mtime) -> the probe's answer: one probe per file and process
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Logs a warning once per process (preflight and loading both decide the prediction type)."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _probed_prediction_type(path: Path, family: Family, config_dir) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _PROBED:
        shapes, metadata = read_checkpoint_header(path)
        folder = Path(config_dir) if config_dir else _config_dir_for(metadata, family)
        unet_config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        _PROBED[key] = probe_prediction_type(_single_file_unet(path, unet_config))
        release = families.config_folder(family, _PROBED[key])  # the family record names the configs it picks
        logger.warning(
            "base_model: %s does not say whether it predicts epsilon or v (no %s beside it, no v_pred marker); "
            "probing its UNet as A1111 does, it is taken as %s (sdtune's shipped %s configs). If that is wrong, set "
            "prediction_type: %s in the config (--prediction-type for sdtune generate), or put the model's yaml "
            "beside the file.",
            path, path.with_suffix(".yaml").name, _PROBED[key], release,
            "epsilon" if _PROBED[key] == "v_prediction" else "v_prediction",
        )  # fmt: skip
    return _PROBED[key]


def _single_file_unet(path: Path, unet_config: dict) -> torch.nn.Module:
    """The UNet of an original-layout single file, alone (float32, CPU)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(LDM_UNET_KEYS)}  # noqa: SIM118
    else:
        tensors = {k: v for k, v in load_legacy_checkpoint(path).items() if k.startswith(LDM_UNET_KEYS)}
    unet = UNet2DConditionModel.from_config(unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(tensors, unet_config))
    return unet.float().eval()


def probe_prediction_type(unet: torch.nn.Module) -> str:
    """What a UNet predicts, judged from one step as A1111 judges SD2.x files (`is_using_v_parameterization_for_sd2`
    in modules/sd_models_config.py): at t = 999 the noisy latent is nearly pure noise, so an epsilon model returns
    about its input, while a v model returns about minus the clean image. Input and context are all 0.5; the model
    is taken as v when its output minus the input averages below -1."""
    width = unet.config.cross_attention_dim
    latents = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
    with torch.no_grad():
        output = unet(latents, torch.tensor([999]), torch.full((1, 2, width), 0.5)).sample
    return "v_prediction" if (output - latents).mean().item() < -1 else "epsilon"


def _config_dir_for(metadata: dict[str, str], family: Family, prediction_type: str = "epsilon") -> Path:
    """A diffusers config folder (configs and tokenizers, no weights) for a single-file checkpoint, in the cache:
    the configs sdtune recorded in the file, else the family's published ones for that prediction type."""
    if EMBEDDED_CONFIG_KEY in metadata:
        configs = json.loads(metadata[EMBEDDED_CONFIG_KEY])
    else:
        configs = families.shipped_configs(family, prediction_type)
    digest = hashlib.sha256(json.dumps(configs, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    folder = cache_dir() / "configs" / f"{family.name}-{digest}"
    if not (folder / "model_index.json").is_file():
        _write_config_folder(folder, configs, family)
    return folder


def _write_config_folder(folder: Path, configs: dict, family: Family) -> None:
    with atomic.atomic_dir(folder) as staging:
        for component, file_name in families.config_files(family).items():
            (staging / component).mkdir()
            (staging / component / file_name).write_text(json.dumps(configs[component], indent=2), encoding="utf-8")
        (staging / "model_index.json").write_text(json.dumps(configs["model_index"], indent=2), encoding="utf-8")
        for spec in family.text_encoders:
            build_clip_tokenizer(spec.pad_token).save_pretrained(staging / spec.tokenizer)


_LAYER_NAMES = {"clip": ("encoder.layers.", "embeddings.token_embedding.weight"),
                "open_clip": ("transformer.resblocks.", "token_embedding.weight")}  # fmt: skip


def _text_encoder_shape(shapes: dict[str, tuple[int, ...]], text: families.TextEncoder) -> tuple[int | None, int]:
    """(width, layers the model uses) of a text encoder in a single file, in its family's layout."""
    layer_prefix, embedding = _LAYER_NAMES[text.checkpoint_layout]
    pattern = re.compile(re.escape(text.checkpoint_prefix + layer_prefix) + r"(\d+)\.")
    layers = {m.group(1) for key in shapes if (m := pattern.match(key))}
    width = shapes.get(text.checkpoint_prefix + embedding, (None, None))[1]
    return width, len(layers) - text.checkpoint_unused_layers if layers else 0


def _check_config_matches(shapes: dict[str, tuple[int, ...]], folder: Path, path: Path, family: Family) -> None:
    """Compares a checkpoint's widths with its config, so a mismatch gets a clear message instead of a shape error.
    (The first text encoder is compared.)"""
    text = family.text_encoders[0]
    unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    text_config = json.loads((folder / text.component / "config.json").read_text(encoding="utf-8"))
    text_width, text_layers = _text_encoder_shape(shapes, text)
    found = {
        "UNet width": shapes.get(checkpoint_keys.UNET_PREFIX + "input_blocks.0.0.weight", (None,))[0],
        "cross-attention width": next(
            (shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None
        ),
        "text encoder width": text_width,
        "text encoder layers": text_layers,
    }
    expected = {
        "UNet width": unet["block_out_channels"][0],
        "cross-attention width": unet["cross_attention_dim"],
        "text encoder width": text_config["hidden_size"],
        "text encoder layers": text_config["num_hidden_layers"],
    }
    mismatches = [
        f"{name} {found[name]} (config: {expected[name]})" for name in expected if found[name] != expected[name]
    ]
    if mismatches:
        raise ModelError(
            f"base_model: {path} does not match the config in {folder}: {'; '.join(mismatches)}. "
            "Set base_model_config to a diffusers folder holding this model's configs."
        )


def load_vae(path: str | os.PathLike, reference: torch.nn.Module, family: Family) -> torch.nn.Module:
    """A VAE to use instead of the base model's, in float32: a diffusers AutoencoderKL folder (or a pipeline folder
    with `vae/`), or a `.safetensors` file in the diffusers layout or the original one, read into the architecture
    of `reference` (the base's own VAE).

    Raises:
        ModelError: Not a VAE sdtune can read, or one that does not fit the base model's VAE.
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    try:
        if path.is_dir():
            subfolder = "" if (path / "config.json").is_file() else "vae"
            return AutoencoderKL.from_pretrained(
                path, subfolder=subfolder, local_files_only=True, torch_dtype=torch.float32
            )
        tensors = safe_load_file(str(path))
        if not any(key.startswith("encoder.down_blocks.") for key in tensors):  # the original layout
            tensors = convert_ldm_vae_checkpoint(tensors, dict(reference.config))
        vae = AutoencoderKL.from_config(reference.config)
        vae.load_state_dict(tensors)
        return vae.float()
    except Exception as error:  # diffusers, torch and safetensors raise many types for a file that does not fit
        raise ModelError(
            f"vae: {path} could not be read as a {family.title} VAE ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:300]}). Give a diffusers AutoencoderKL folder or a .safetensors VAE file "
            "of the base model's architecture."
        ) from error


def load_for_training(config) -> BaseModel:
    """The base model a training config names, with its overrides: another VAE, a forced prediction type, zero
    terminal SNR (the noise schedule, samples and the recorded base all follow them).

    Raises:
        ConfigError: Zero terminal SNR on an epsilon model (it cannot denoise pure noise at the last step).
    """
    base = load_base_model(config.base_model, config.base_model_config, config.prediction_type)
    if config.vae:
        base.vae = load_vae(config.vae, base.vae, base.family)
    if config.zero_terminal_snr:
        base.scheduler_config = with_schedule(base.scheduler_config, {"rescale_betas_zero_snr": True})
    if base.scheduler_config.get("rescale_betas_zero_snr") and base.prediction_type != "v_prediction":
        raise ConfigError(
            ["zero_terminal_snr: the last timestep is then pure noise, which an epsilon-prediction model cannot "
             "denoise (Lin et al. 2024); use it with v-prediction models (prediction_type: v_prediction)."]
        )  # fmt: skip
    return base


def read_base(path: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> tuple[Family, dict]:
    """The base model's family and tokenizers (by pipeline attribute name), without its weights (cheap), after
    checking that the family is supported.

    Raises:
        ModelError: Missing path, unknown or unsupported model.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    if not path.exists():
        raise ModelError(f"base_model: {path} does not exist.")
    if path.is_dir():
        family, folder = require_supported(detect_family_from_folder(path), path), path
    else:
        shapes, metadata = read_checkpoint_header(path)
        family = require_supported(detect_family_from_keys(shapes, path), path)
        folder = Path(config_dir) if config_dir else _config_dir_for(metadata, family)
    tokenizers = {
        spec.tokenizer: CLIPTokenizer.from_pretrained(folder / spec.tokenizer, local_files_only=True)
        for spec in family.text_encoders
    }
    return family, tokenizers


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
    atomic.write_text(cache_file, json.dumps(cache, indent=1))
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
# SDXL's shape in small: two text encoders of different widths (so swapped keys cannot fit), their states
# concatenated (32 + 64) for the cross-attention, the pooled projection (64) plus 6 time ids x 8 for the added
# embedding, linear projections and 1/2 transformer layers per block as in SDXL.
TINY_SDXL_CONFIGS = {
    "unet": {
        **TINY_CONFIGS["unet"],
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 96,
        "transformer_layers_per_block": [1, 2],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 64 + 6 * 8,
    },
    "vae": {**TINY_CONFIGS["vae"], "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoder": TINY_CONFIGS["text_encoder"],
    "text_encoder_2": {
        **TINY_CONFIGS["text_encoder"],
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "hidden_act": "gelu",
        "projection_dim": 64,
        "pad_token_id": 0,
    },
}
# SD2.x's shape in small: OpenCLIP's `gelu` text encoder padding with "!" (48 wide, so SD1's tiny files cannot fit),
# linear projections in the transformer blocks.
TINY_SD2_CONFIGS = {
    "unet": {**TINY_CONFIGS["unet"], "cross_attention_dim": 48, "use_linear_projection": True},
    "vae": TINY_CONFIGS["vae"],
    "text_encoder": {**TINY_CONFIGS["text_encoder"], "hidden_size": 48, "hidden_act": "gelu", "pad_token_id": 0},
}
# preset -> (family whose published configs it starts from, the prediction type of that release, configs replaced)
PRESETS = {
    "tiny": (families.SD1, "epsilon", TINY_CONFIGS),
    "sd15": (families.SD1, "epsilon", {}),
    "tiny-sd2": (families.SD2, "epsilon", TINY_SD2_CONFIGS),
    "tiny-sd2-v": (families.SD2, "v_prediction", TINY_SD2_CONFIGS),
    "sd2": (families.SD2, "epsilon", {}),
    "sd2-768v": (families.SD2, "v_prediction", {}),
    "tiny-sdxl": (families.SDXL, "epsilon", TINY_SDXL_CONFIGS),
    "sdxl": (families.SDXL, "epsilon", {}),
}


def preset_configs(preset: str) -> dict:
    """The component configs of a base-model preset: `tiny` (about 2 M parameters) or `sd15` (SD1.5's shapes);
    `tiny-sd2`, `tiny-sd2-v` or `sd2`, `sd2-768v` (SD2.1 512-base's / 768-v's shapes, 1.3 B parameters);
    `tiny-sdxl` or `sdxl` (SDXL 1.0 base's shapes, 3.5 B parameters)."""
    if preset not in PRESETS:
        raise ModelError(f"preset {preset!r} is not one of {', '.join(PRESETS)}.")
    family, prediction_type, replaced = PRESETS[preset]
    return {**families.shipped_configs(family, prediction_type), **copy.deepcopy(replaced)}


def build_components(preset: str = "tiny", seed: int = 0) -> dict:
    """Random-weight components of a preset (its tokenizers and text encoders under their pipeline attribute names,
    `unet`, `vae`, `scheduler_config`, `configs`)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    configs = preset_configs(preset)
    torch.manual_seed(seed)
    components = {}
    for spec in PRESETS[preset][0].text_encoders:
        text_config = {k: v for k, v in configs[spec.component].items() if k not in ("architectures", "model_type")}
        components[spec.tokenizer] = build_clip_tokenizer(spec.pad_token)
        model_class = getattr(transformers, spec.model_class)
        components[spec.component] = model_class(transformers.CLIPTextConfig(**text_config))
    return {
        **components,
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
    overwrite: bool = False,
) -> None:
    """Writes a random-weight base model of a preset as a diffusers folder and/or a single-file checkpoint.

    Args:
        folder: Where to write the diffusers folder (None: do not write one).
        checkpoint: Where to write the original-layout `.safetensors` checkpoint (None: do not write one).
        preset: One of `PRESETS` (see `preset_configs`).
        seed: Seed for the random weights; equal seeds give equal files.
        dtype: Dtype of the weights in the checkpoint file.
        overwrite: Replace a folder or file that an earlier `write_base_model` wrote (nothing else is replaced).

    Raises:
        ModelError: A target path that exists (without `overwrite`), is of the wrong kind, or is the current folder.
    """
    problems = _target_problems(folder, checkpoint, overwrite)
    if problems:
        raise ModelError(" ".join(problems))
    components = build_components(preset, seed)
    components["configs"]["model_index"][MADE_BY_KEY] = preset  # marks the folder as one --overwrite may replace
    # A checkpoint with published shapes loads with the shipped config, like any real one; others carry theirs, and
    # so do the v-prediction ones of a family whose files do not say it otherwise (SD2.x 768-v: its scheduler).
    family, prediction_type, replaced = PRESETS[preset]
    embed = bool(replaced) or prediction_type != families.shipped_configs(family)["scheduler"]["prediction_type"]
    save_base_model(components, folder, checkpoint, dtype, embed, {MADE_BY_KEY: preset})


def _made_by_sdtune(path: Path) -> bool:
    """Whether `path` is a base model `write_base_model` wrote (its marker in model_index.json / the header)."""
    try:
        if path.is_dir():
            return MADE_BY_KEY in json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        with safe_open(str(path), "pt") as handle:
            return MADE_BY_KEY in (handle.metadata() or {})
    except Exception:  # unreadable: not something sdtune wrote
        return False


def _target_problems(folder, checkpoint, overwrite: bool) -> list[str]:
    """Why `make-base` may not write to these paths: never onto the current folder or a file/folder of another
    kind, never over what exists unless `overwrite` and sdtune wrote it."""
    problems = []
    targets = [(Path(folder), "folder") for _ in (folder,) if folder is not None]
    targets += [(Path(checkpoint), "checkpoint") for _ in (checkpoint,) if checkpoint is not None]
    for path, kind in targets:
        if kind == "folder" and path.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            problems.append(f"{path} is the current folder (or holds it); name a new folder, e.g. models/tiny-sd1.")
        elif kind == "folder" and path.exists() and not path.is_dir():
            problems.append(f"{path} is a file; name a folder for the diffusers model.")
        elif kind == "checkpoint" and path.is_dir():
            problems.append(f"--checkpoint {path} is a folder; name a .safetensors file.")
        elif path.exists() and (path.is_file() or any(path.iterdir())):
            if not overwrite:
                problems.append(
                    f"{path} exists and is not empty; choose a new path, or add --overwrite to replace it."
                )
            elif not _made_by_sdtune(path):
                problems.append(
                    f"{path} was not written by sdtune make-base, so --overwrite will not replace it; move it away "
                    "or choose a new path."
                )
    return problems


def family_of_configs(configs: dict) -> Family:
    """The family a set of component configs (`model_index`, `text_encoder`, ...) describes.

    Raises:
        ModelError: Configs of a family sdtune does not train on.
    """
    signature = families.from_pipeline(configs["model_index"].get("_class_name", ""), configs.get("text_encoder"))
    return require_supported(signature.name if signature else "unknown", Path("configs"))


def save_base_model(
    components: dict,
    folder: str | os.PathLike | None,
    checkpoint: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    embed_config: bool = True,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Saves components as a diffusers folder and/or an original-layout single-file checkpoint.

    Args:
        components: Tokenizers and text encoders under their pipeline attribute names, `unet`, `vae`,
            `scheduler_config`, and `configs` (the component configs as plain dicts, plus `model_index`, which with
            the text-encoder config names the family).
        folder: Diffusers folder to write (None: none).
        checkpoint: `.safetensors` checkpoint to write (None: none).
        dtype: Dtype of the saved weights (both outputs).
        embed_config: Record the configs in the checkpoint's header, so it loads without a config folder.
        extra_metadata: More header entries for the checkpoint.
    """
    family = family_of_configs(components["configs"])
    if folder is not None:
        _write_folder(Path(folder), components, dtype, family)
    if checkpoint is not None:
        state_dict = {
            **checkpoint_keys.unet_to_ldm(components["unet"].state_dict(), components["configs"]["unet"]),
            **checkpoint_keys.vae_to_ldm(components["vae"].state_dict(), components["configs"]["vae"]),
        }
        for spec in family.text_encoders:
            encoder_state = components[spec.component].state_dict()
            state_dict.update(checkpoint_keys.text_encoder_to_checkpoint(encoder_state, spec))
        state_dict = {key: value.to(dtype).contiguous() for key, value in state_dict.items()}
        # default=str: configs of loaded models carry paths (`_name_or_path`), which JSON cannot hold as they are.
        metadata = {EMBEDDED_CONFIG_KEY: json.dumps(components["configs"], default=str)} if embed_config else {}
        metadata.update(extra_metadata or {})
        with atomic.atomic_file(checkpoint, durable=True) as temporary:
            save_file(state_dict, str(temporary), metadata=metadata)


def _write_folder(folder: Path, components: dict, dtype: torch.dtype, family: Family) -> None:
    with atomic.atomic_dir(folder, durable=True) as staging:
        modules = ["unet", "vae", *(spec.component for spec in family.text_encoders)]
        for name in modules:
            module = components[name] if dtype == torch.float32 else copy.deepcopy(components[name]).to(dtype)
            module.save_pretrained(staging / name)
        for spec in family.text_encoders:
            components[spec.tokenizer].save_pretrained(staging / spec.tokenizer)
        (staging / "scheduler").mkdir()
        scheduler_text = json.dumps(components["scheduler_config"], indent=2)
        (staging / "scheduler" / "scheduler_config.json").write_text(scheduler_text, encoding="utf-8")
        model_index = json.dumps(components["configs"]["model_index"], indent=2)
        (staging / "model_index.json").write_text(model_index, encoding="utf-8")
