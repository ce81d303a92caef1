"""Original-checkpoint key names: diffusers names -> the original (LDM / CompVis / sgm) single-file layout.

Users mostly hold single-file checkpoints in the original layout (`model.diffusion_model.*`, the family's text-encoder
prefix, `first_stage_model.*`). diffusers reads that layout (`from_single_file`) but has no writer for it, so sdtune
maps the names itself when it writes a base model, and when a family's kohya LoRA keys spell UNet modules the LDM way
(SDXL). The mapping is the inverse of diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`; the
round trip through diffusers' own reader is tested.
"""

from __future__ import annotations

import re

import torch

from sdtune.families import LDM_UNET_KEYS as UNET_PREFIX
from sdtune.families import TextEncoder

VAE_PREFIX = "first_stage_model."

_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_block_prefixes(config: dict) -> dict[str, str]:
    """Diffusers block prefix -> LDM block prefix, derived from the UNet config (any depth and width)."""
    layers = config["layers_per_block"]
    mapping = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's added conditioning (sgm names)
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    num_blocks = len(config["down_block_types"])
    for i in range(num_blocks):
        for j in range(layers):
            ldm_index = (layers + 1) * i + j + 1
            mapping[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{ldm_index}.0."
            mapping[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{ldm_index}.1."
        mapping[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
    for i, block_type in enumerate(config["up_block_types"]):
        for j in range(layers + 1):
            ldm_index = (layers + 1) * i + j
            mapping[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{ldm_index}.0."
            mapping[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{ldm_index}.1."
        upsample_slot = 2 if "CrossAttn" in block_type else 1
        mapping[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(layers + 1) * i + layers}.{upsample_slot}."
    return mapping


def _rename(key: str, prefixes: dict[str, str], inner_names: dict[str, str]) -> str:
    for diffusers_prefix, ldm_prefix in prefixes.items():
        if key.startswith(diffusers_prefix):
            rest = key[len(diffusers_prefix) :]
            for diffusers_name, ldm_name in inner_names.items():
                if rest.startswith(diffusers_name + "."):
                    rest = ldm_name + rest[len(diffusers_name) :]
                    break
            return ldm_prefix + rest
    raise KeyError(f"no original-layout name known for diffusers key {key!r}")


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Renames a diffusers `UNet2DConditionModel` state dict to `model.diffusion_model.*` keys.

    Args:
        state_dict: The UNet's `state_dict()`.
        config: The UNet's config (block types and `layers_per_block` decide the block numbering).

    Returns:
        The same tensors under original-layout names.
    """
    prefixes = _unet_block_prefixes(config)
    return {UNET_PREFIX + _rename(key, prefixes, _RESNET_NAMES): value for key, value in state_dict.items()}


def _vae_block_prefixes(config: dict) -> dict[str, str]:
    num_blocks = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    mapping = {}
    for part in ("encoder", "decoder"):
        mapping[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        mapping[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        mapping[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        mapping[f"{part}.conv_norm_out."] = f"{part}.norm_out."
        mapping[f"{part}.conv_in."] = f"{part}.conv_in."
        mapping[f"{part}.conv_out."] = f"{part}.conv_out."
    for i in range(num_blocks):
        for j in range(layers):
            mapping[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        mapping[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        # The decoder's up blocks are numbered from the lowest resolution in diffusers, from the highest in LDM.
        ldm_up = num_blocks - 1 - i
        for j in range(layers + 1):
            mapping[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{ldm_up}.block.{j}."
        mapping[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{ldm_up}.upsample."
    mapping["quant_conv."] = "quant_conv."
    mapping["post_quant_conv."] = "post_quant_conv."
    return mapping


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Renames a diffusers `AutoencoderKL` state dict to `first_stage_model.*` keys.

    The original VAE's mid-block attention uses 1x1 convolutions where diffusers uses Linear layers, so those
    weights gain two trailing singleton dimensions.

    Args:
        state_dict: The VAE's `state_dict()`.
        config: The VAE's config.

    Returns:
        The same tensors under original-layout names and shapes.
    """
    prefixes = _vae_block_prefixes(config)
    converted = {}
    for key, value in state_dict.items():
        inner = _VAE_ATTENTION_NAMES if ".mid_block.attentions." in key else _VAE_RESNET_NAMES
        new_key = _rename(key, prefixes, inner)
        if ".mid.attn_1." in new_key and new_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        converted[VAE_PREFIX + new_key] = value
    return converted


def text_encoder_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Renames a transformers `CLIPTextModel` state dict to original-layout keys under `prefix` (the family's
    `TextEncoder.checkpoint_prefix`, e.g. `cond_stage_model.transformer.text_model.`).

    transformers >= 5 dropped the `text_model.` level from `CLIPTextModel`; older versions had it. Both map to the
    same original-layout names.
    """
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key.startswith("text_projection."):
            continue  # CLIPTextModel has none; guard against CLIPTextModelWithProjection state dicts.
        converted[prefix + key] = value
    return converted


_OPEN_CLIP_LAYER_NAMES = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def open_clip_text_to_ldm(
    state_dict: dict[str, torch.Tensor], prefix: str, unused_layers: int = 0
) -> dict[str, torch.Tensor]:
    """Renames a transformers CLIP text model (with or without projection) to OpenCLIP's original-layout keys under
    `prefix` (e.g. `conditioner.embedders.1.model.`): q/k/v packed into `attn.in_proj_weight`/`_bias`, the position
    embedding as a bare tensor, `text_projection` transposed ([width, projection]). The inverse of diffusers'
    `convert_open_clip_checkpoint`.

    With `unused_layers` (SD2.x: 1), the layers the model does not run are added after its own, as kohya's
    `convert_text_encoder_state_dict_to_sd_v2(make_dummy_weights=True)` adds them: copies of the last layer, plus an
    identity `text_projection` when the model has none. OpenCLIP-H then has its 24 layers, which loaders of the whole
    model (A1111, ComfyUI) expect; the UNet reads the penultimate layer, so the copies change no output, and
    diffusers and kohya drop them on reading."""
    converted, packed = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.token_embedding.weight":
            converted[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            converted[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            converted[prefix + "ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif key == "text_projection.weight":
            converted[prefix + "text_projection"] = value.T.contiguous()
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            packed.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)$", key):
            rest = next(
                (new + m[2][len(old) :] for old, new in _OPEN_CLIP_LAYER_NAMES.items() if m[2].startswith(old)), None
            )
            if rest is None:
                raise KeyError(f"no OpenCLIP name known for text-encoder key {key!r}")
            converted[f"{prefix}transformer.resblocks.{m[1]}.{rest}"] = value
    for (layer, kind), qkv in packed.items():
        converted[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([qkv[c] for c in "qkv"])
    if unused_layers:
        _add_unused_layers(converted, prefix, unused_layers)
    return converted


def _add_unused_layers(converted: dict[str, torch.Tensor], prefix: str, count: int) -> None:
    """Appends `count` copies of the last OpenCLIP layer (and an identity `text_projection` if there is none)."""
    blocks = prefix + "transformer.resblocks."
    last = max(int(key[len(blocks) :].partition(".")[0]) for key in converted if key.startswith(blocks))
    for extra in range(1, count + 1):
        for key in [key for key in converted if key.startswith(f"{blocks}{last}.")]:
            converted[key.replace(f"{blocks}{last}.", f"{blocks}{last + extra}.", 1)] = converted[key].clone()
    width = converted[prefix + "token_embedding.weight"].shape[1]
    converted.setdefault(
        prefix + "text_projection", torch.eye(width, dtype=converted[prefix + "token_embedding.weight"].dtype)
    )


def text_encoder_to_checkpoint(state_dict: dict[str, torch.Tensor], encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """A text encoder's state dict under its family's original-layout names (`checkpoint_layout`, prefix)."""
    if encoder.checkpoint_layout == "open_clip":
        return open_clip_text_to_ldm(state_dict, encoder.checkpoint_prefix, encoder.checkpoint_unused_layers)
    return text_encoder_to_ldm(state_dict, encoder.checkpoint_prefix)


def unet_module_to_ldm(module_path: str, config: dict) -> str:
    """The original-layout path of a UNet module (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`),
    as SDXL's kohya LoRA keys spell it.

    Args:
        module_path: The diffusers module path.
        config: The UNet's config (block types and `layers_per_block` decide the block numbering).
    """
    return _rename(module_path + ".", _unet_block_prefixes(config), _RESNET_NAMES).removesuffix(".")
