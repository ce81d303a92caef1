"""Model families as data: how files of each Stable Diffusion family are recognised, and for each family sdtune
trains on, one record of everything the code that loads, trains, exports and gates needs to know about it.

Two kinds of record:
- `Signature`: how a family's files are recognised (single-file keys, diffusers pipeline class, LoRA metadata and key
  prefixes, text width). Every family sdtune knows has one, so a model it cannot train is refused by name.
- `Family`: a family sdtune trains on: its signature plus its text encoders, kohya key naming, shipped configs,
  ModelSpec and kohya metadata values. Nothing outside this module branches on a family's name; adding a family means
  adding a record here (and the code for what is really new about it, e.g. SDXL's pooled embedding and time ids).

Facts from the clients' sources, as collected in shared/FORMATS.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Literal

SD1_TEXT_ENCODER_KEYS = "cond_stage_model.transformer.text_model."
LDM_UNET_KEYS = "model.diffusion_model."


@dataclass(frozen=True)
class Signature:
    """How files of a model family are recognised.

    Attributes:
        name: Short name files record (`sdtune.model_family`) and code passes around, e.g. `sd1`.
        title: What messages call it, e.g. `Stable Diffusion 1.x`.
        checkpoint_keys: Groups of key prefixes; a single-file checkpoint holding a key under each prefix of some group
            is of this family.
        pipeline_class: Prefix of the `_class_name` in a diffusers folder's `model_index.json` (None: not told apart
            by its folder).
        text_activation: The text encoder's `hidden_act` in a diffusers folder (tells SD1 from SD2, same pipeline).
        text_width: Width of its text encoder's output (of the first one): an embedding or LoRA of this width
            without other clues is taken to be of this family.
        kohya_versions: Prefixes of the `ss_base_model_version` values its LoRAs carry.
        lora_prefixes: kohya key prefixes only its LoRAs use.
        embedding_keys: The keys of its Textual Inversion files, when it has several text encoders (one tensor
            each); single-encoder families' files hold one tensor, told apart by `text_width`.
    """

    name: str
    title: str
    checkpoint_keys: tuple[tuple[str, ...], ...]
    pipeline_class: str | None = None
    text_activation: str | None = None
    text_width: int | None = None
    kohya_versions: tuple[str, ...] = ()
    lora_prefixes: tuple[str, ...] = ()
    embedding_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family and what files and clients call it.

    Attributes:
        component: Its diffusers pipeline attribute (`text_encoder`; SDXL's second one is `text_encoder_2`).
        tokenizer: Its tokenizer's pipeline attribute.
        model_class: Its transformers class.
        pad_token: The token its tokenizer pads with (`<|endoftext|>` for OpenAI CLIP, `!` for OpenCLIP).
        hidden_layer: The hidden state the UNet reads at `clip_skip` 1 (-1: the last layer).
        final_layer_norm: Whether that state goes through the final LayerNorm (SD1.x/SD2.x) or not (SDXL).
        kohya_prefix: Prefix of its kohya LoRA keys; `text_model_` and the module path follow.
        embedding_key: Key of its vectors in Textual Inversion files.
        checkpoint_prefix: Prefix of its weights in single-file checkpoints.
        checkpoint_layout: How its weights are named under that prefix: `clip` (transformers' CLIP names, OpenAI
            CLIP-L) or `open_clip` (OpenCLIP's names with q/k/v packed in `in_proj_weight`: SD2.x's and SDXL's
            OpenCLIP encoders). A1111 runs OpenCLIP layers natively and patches their attention only when a LoRA
            holds all of q, k, v and out for a layer (FORMATS.md).
        checkpoint_unused_layers: Layers its single files hold after the ones the model uses (SD2.x: OpenCLIP-H
            has 24, the UNet reads the penultimate one, so diffusers and kohya load 23 and drop the last). sdtune
            writes them as kohya does (a copy of the last used layer) so full-model loaders find the whole encoder.
        pooled: Whether its projected, pooled output (at the first end-of-text token) conditions the UNet (SDXL's
            second encoder).
    """

    component: str
    tokenizer: str
    model_class: str
    pad_token: str
    hidden_layer: int
    final_layer_norm: bool
    kohya_prefix: str
    embedding_key: str
    checkpoint_prefix: str
    checkpoint_layout: Literal["clip", "open_clip"] = "clip"
    checkpoint_unused_layers: int = 0
    pooled: bool = False


@dataclass(frozen=True)
class Family:
    """A model family sdtune loads, trains, exports and gates.

    Attributes:
        signature: How its files are recognised (name, title, markers).
        text_encoders: Its text encoders, in the order their states are concatenated for the UNet.
        unet_key_style: kohya LoRA names of UNet modules: `diffusers` module paths (SD1.x, SD2.x) or the original
            LDM/sgm block paths (SDXL), FORMATS.md rule 1.
        config_folder: Folder under `sdtune/base_configs/` with its published diffusers configs (single files load
            against them offline).
        config_folder_v: The same for its v-prediction release, when that has the same weights' shapes (SD2.x
            768-v: its single files often do not say which they are, see `models.prediction_type_of`).
        pipeline_class: The diffusers pipeline that runs it.
        modelspec_architecture: ModelSpec architecture stem of its adapters (`/lora`, `/textual-inversion` follow).
        modelspec_architecture_v: The same for v-prediction models, when it differs (SD2.x 768-v).
        modelspec_implementation: ModelSpec implementation value of its LoRAs (kohya's `sai_model_spec`: `diffusers`
            for SD1.x/SD2.x, Stability's repository for SDXL; embeddings always name Stability's).
        kohya_base_model_version: What kohya writes as `ss_base_model_version`.
        kohya_base_model_version_v: The same for v-prediction models, when kohya writes another value.
        kohya_v2: What kohya writes as `ss_v2`.
        time_ids: Whether the UNet takes SDXL's added conditioning: the pooled text embedding and the time ids
            (original size, crop top-left, target size).
        clip_skip: Whether `clip_skip` means something for it (SDXL reads the penultimate layer of both encoders
            by design; kohya ignores `clip_skip` there with a warning, sdtune refuses it).
        vae_overflows_in_fp16: Whether its VAE overflows to NaN in float16 (SDXL's): with fp16 mixed precision it is
            kept in float32 unless another `vae` is given.
    """

    signature: Signature
    text_encoders: tuple[TextEncoder, ...]
    unet_key_style: Literal["diffusers", "ldm"]
    config_folder: str
    pipeline_class: str
    modelspec_architecture: str
    modelspec_implementation: str
    kohya_base_model_version: str
    config_folder_v: str | None = None
    modelspec_architecture_v: str | None = None
    kohya_base_model_version_v: str | None = None
    kohya_v2: bool = False
    time_ids: bool = False
    clip_skip: bool = True
    vae_overflows_in_fp16: bool = False

    @property
    def name(self) -> str:
        """The family's short name (`sd1`)."""
        return self.signature.name

    @property
    def title(self) -> str:
        """The family's name for people (`Stable Diffusion 1.x`)."""
        return self.signature.title

    def modelspec_arch(self, prediction_type: str) -> str:
        """ModelSpec architecture stem for a model of this family with the given prediction type."""
        if prediction_type == "v_prediction" and self.modelspec_architecture_v:
            return self.modelspec_architecture_v
        return self.modelspec_architecture

    def kohya_version(self, prediction_type: str) -> str:
        """`ss_base_model_version` for a model of this family with the given prediction type."""
        if prediction_type == "v_prediction" and self.kohya_base_model_version_v:
            return self.kohya_base_model_version_v
        return self.kohya_base_model_version

    def text_encoder(self, component: str) -> TextEncoder:
        """The text encoder whose pipeline attribute is `component`.

        Raises:
            KeyError: The family has no such text encoder.
        """
        for encoder in self.text_encoders:
            if encoder.component == component:
                return encoder
        raise KeyError(f"{self.title} has no text encoder {component!r}")


SD1 = Family(
    signature=Signature(
        name="sd1",
        title="Stable Diffusion 1.x",
        checkpoint_keys=((LDM_UNET_KEYS, SD1_TEXT_ENCODER_KEYS),),
        pipeline_class="StableDiffusionPipeline",
        text_activation="quick_gelu",
        text_width=768,
        kohya_versions=("sd_v1",),
    ),
    text_encoders=(
        TextEncoder(
            component="text_encoder",
            tokenizer="tokenizer",
            model_class="CLIPTextModel",
            pad_token="<|endoftext|>",
            hidden_layer=-1,
            final_layer_norm=True,
            kohya_prefix="lora_te_",
            embedding_key="emb_params",
            checkpoint_prefix=SD1_TEXT_ENCODER_KEYS,
        ),
    ),
    unet_key_style="diffusers",
    config_folder="sd1",
    pipeline_class="StableDiffusionPipeline",
    modelspec_architecture="stable-diffusion-v1",
    modelspec_implementation="diffusers",
    kohya_base_model_version="sd_v1",
)

SD2 = Family(
    signature=Signature(
        name="sd2",
        title="Stable Diffusion 2.x",
        checkpoint_keys=((LDM_UNET_KEYS, "cond_stage_model.model."),),
        pipeline_class="StableDiffusionPipeline",
        text_activation="gelu",
        text_width=1024,
        kohya_versions=("sd_v2",),
    ),
    text_encoders=(
        TextEncoder(
            component="text_encoder",
            tokenizer="tokenizer",
            model_class="CLIPTextModel",
            pad_token="!",
            hidden_layer=-1,  # the last of the 23 layers kept = OpenCLIP-H's penultimate, through the final LayerNorm
            final_layer_norm=True,
            kohya_prefix="lora_te_",
            embedding_key="emb_params",
            checkpoint_prefix="cond_stage_model.model.",
            checkpoint_layout="open_clip",
            checkpoint_unused_layers=1,
        ),
    ),
    unet_key_style="diffusers",
    config_folder="sd2",
    config_folder_v="sd2_768v",
    pipeline_class="StableDiffusionPipeline",
    modelspec_architecture="stable-diffusion-v2-512",
    modelspec_architecture_v="stable-diffusion-v2-768-v",
    modelspec_implementation="diffusers",
    kohya_base_model_version="sd_v2",
    kohya_base_model_version_v="sd_v2_v",
    kohya_v2=True,
)

SDXL = Family(
    signature=Signature(
        name="sdxl",
        title="SDXL base",
        checkpoint_keys=(("conditioner.embedders.1.",),),
        pipeline_class="StableDiffusionXL",
        kohya_versions=("sdxl_",),
        lora_prefixes=("lora_te1_", "lora_te2_"),
        embedding_keys=("clip_l", "clip_g"),
    ),
    text_encoders=(
        TextEncoder(
            component="text_encoder",
            tokenizer="tokenizer",
            model_class="CLIPTextModel",
            pad_token="<|endoftext|>",
            hidden_layer=-2,
            final_layer_norm=False,
            kohya_prefix="lora_te1_",
            embedding_key="clip_l",
            checkpoint_prefix="conditioner.embedders.0.transformer.text_model.",
        ),
        TextEncoder(
            component="text_encoder_2",
            tokenizer="tokenizer_2",
            model_class="CLIPTextModelWithProjection",
            pad_token="!",
            hidden_layer=-2,
            final_layer_norm=False,
            kohya_prefix="lora_te2_",
            embedding_key="clip_g",
            checkpoint_prefix="conditioner.embedders.1.model.",
            checkpoint_layout="open_clip",
            pooled=True,
        ),
    ),
    unet_key_style="ldm",
    config_folder="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    modelspec_architecture="stable-diffusion-xl-v1-base",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    kohya_base_model_version="sdxl_base_v1-0",
    time_ids=True,
    clip_skip=False,
    vae_overflows_in_fp16=True,
)

# Every family recognised: the ones trained on, and the ones refused by name. Detection tries them in this order,
# the more specific markers first.
SIGNATURES = (
    Signature(
        "sd3",
        "Stable Diffusion 3.x",
        checkpoint_keys=((LDM_UNET_KEYS + "joint_blocks.",), ("joint_blocks.",)),
        pipeline_class="StableDiffusion3",
    ),
    Signature(
        "flux",
        "FLUX",
        checkpoint_keys=((LDM_UNET_KEYS + "double_blocks.",), ("double_blocks.",)),
        pipeline_class="Flux",
    ),
    SDXL.signature,
    Signature("sdxl_refiner", "SDXL refiner", checkpoint_keys=(("conditioner.embedders.0.model.",),)),
    SD2.signature,
    SD1.signature,
)
FAMILIES = {family.name: family for family in (SD1, SD2, SDXL)}
KOHYA_UNET_PREFIX = "lora_unet_"


def get(name: str | None) -> Family | None:
    """The record of a family sdtune trains on, or None (unknown, or only recognised)."""
    return FAMILIES.get(name or "")


def title(name: str | None) -> str:
    """What messages call a family (its name back when unknown)."""
    return next((s.title for s in SIGNATURES if s.name == name), name or "unknown")


def supported_titles() -> str:
    """The families sdtune trains on, for messages."""
    return ", ".join(family.title for family in FAMILIES.values())


def from_checkpoint_keys(keys) -> Signature | None:
    """The family whose single-file markers the keys carry (None: no family's)."""
    keys = list(keys)
    for signature in SIGNATURES:
        for group in signature.checkpoint_keys:
            if all(any(key.startswith(prefix) for key in keys) for prefix in group):
                return signature
    return None


def from_pipeline(class_name: str, text_config: dict | None) -> Signature | None:
    """The family of a diffusers folder from its pipeline class and text-encoder config (None: not a known one).

    Families sharing a pipeline class are told apart by the text encoder's activation or width (SD2.x converts
    OpenCLIP-H to a `gelu` CLIPTextModel of width 1024; SD1.x's CLIP-L uses `quick_gelu`).
    """
    matches = [s for s in SIGNATURES if s.pipeline_class and class_name.startswith(s.pipeline_class)]
    for signature in matches[:-1]:  # the last match (SD1.x) is what a folder is when nothing else tells
        config = text_config or {}
        told = {"hidden_act": signature.text_activation, "hidden_size": signature.text_width}
        if any(value is not None and config.get(key) == value for key, value in told.items()):
            return signature
    return matches[-1] if matches else None


def from_kohya_metadata(version: str, keys) -> Signature | None:
    """The family a LoRA's `ss_base_model_version` or key prefixes name (None: they name none)."""
    for signature in SIGNATURES:
        if any(version.startswith(prefix) for prefix in signature.kohya_versions):
            return signature
        if signature.lora_prefixes and any(key.startswith(signature.lora_prefixes) for key in keys):
            return signature
    return None


def from_text_width(width: int) -> Signature | None:
    """The family whose (first) text encoder has this width, or None."""
    return next((s for s in SIGNATURES if s.text_width == width), None)


def from_embedding_keys(keys) -> Signature | None:
    """The several-encoder family whose embedding keys all occur in `keys`, or None."""
    return next((s for s in SIGNATURES if s.embedding_keys and all(k in keys for k in s.embedding_keys)), None)


def embedding_keys() -> tuple[str, ...]:
    """Every key a Textual Inversion file of a known family may hold its vectors under."""
    keys = [encoder.embedding_key for family in FAMILIES.values() for encoder in family.text_encoders]
    keys += [key for signature in SIGNATURES for key in signature.embedding_keys]
    return tuple(dict.fromkeys(keys))


def kohya_text_prefixes() -> tuple[str, ...]:
    """Every kohya text-encoder key prefix of every known family."""
    prefixes = [encoder.kohya_prefix for family in FAMILIES.values() for encoder in family.text_encoders]
    prefixes += [prefix for signature in SIGNATURES for prefix in signature.lora_prefixes]
    return tuple(dict.fromkeys(prefixes))


CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}


def config_files(family: Family) -> dict[str, str]:
    """Component folder -> config file name of a family's diffusers layout (tokenizers aside)."""
    return {**CONFIG_FILES, **{encoder.component: "config.json" for encoder in family.text_encoders}}


def config_folder(family: Family, prediction_type: str = "epsilon") -> str:
    """The folder under `sdtune/base_configs/` with the published configs of the family's release that predicts
    `prediction_type` (its only one, when it has no separate v-prediction release)."""
    if prediction_type == "v_prediction" and family.config_folder_v:
        return family.config_folder_v
    return family.config_folder


def shipped_configs(family: Family, prediction_type: str = "epsilon") -> dict:
    """The published diffusers configs of a family (of its release that predicts `prediction_type`), as shipped in
    `sdtune/base_configs/`: `model_index` plus one config per component."""
    root = resources.files("sdtune") / "base_configs" / config_folder(family, prediction_type)
    configs = {"model_index": json.loads((root / "model_index.json").read_text(encoding="utf-8"))}
    for component, file_name in config_files(family).items():
        configs[component] = json.loads((root / component / file_name).read_text(encoding="utf-8"))
    return configs


def native_resolution(family: Family, prediction_type: str = "epsilon") -> int:
    """The family's native image side in pixels, from its published configs: the UNet's sample size times the VAE's
    downsampling (SD1.x 64 x 8 = 512, SD2.x 512-base 512 and 768-v 96 x 8 = 768, SDXL 128 x 8 = 1024)."""
    configs = shipped_configs(family, prediction_type)
    return configs["unet"]["sample_size"] * 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
