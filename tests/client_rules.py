"""The embedding-loading rules of AUTOMATIC1111 WebUI and ComfyUI, as `shared/FORMATS.md` records them.

These are our own transcriptions of what each client does with a file (which key it reads, which shape it accepts),
so tests can say "this file loads in A1111 / ComfyUI at width 768" without running either client.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def _read(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def a1111_embedding_vectors(path: Path, expected_width: int) -> torch.Tensor | None:
    """What A1111 registers for an embedding file, or None when it skips it.

    A1111 reads `string_to_param` (its own `.pt`), an SDXL `clip_l`/`clip_g` pair, or a dict holding exactly one
    tensor; a 1-D tensor is one vector. Files whose width differs from the loaded model's are skipped silently.
    """
    data = _read(path)
    if "string_to_param" in data:
        params = data["string_to_param"]
        if len(params) != 1:
            raise ValueError("embedding file has multiple terms in it")
        vectors = next(iter(params.values()))
    elif "clip_g" in data and "clip_l" in data:
        vectors = data["clip_l"]
    elif isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        if len(data) != 1:
            raise ValueError("embedding file has multiple terms in it")
        vectors = next(iter(data.values()))
    else:
        raise ValueError(f"Couldn't identify {path.name} as neither textual inversion embedding nor diffuser concept.")
    vectors = vectors.unsqueeze(0) if vectors.ndim == 1 else vectors
    return vectors.float() if vectors.shape[-1] == expected_width else None


def comfyui_embedding_vectors(path: Path, embedding_size: int, embed_key: str = "clip_l") -> torch.Tensor | None:
    """What ComfyUI inserts for `embedding:<stem>`, or None when it ignores it (with a shape-mismatch warning).

    ComfyUI reads `string_to_param`, else the key of the encoder (`clip_l` for SD1.x), else the first tensor.
    """
    data = _read(path)
    if "string_to_param" in data:
        vectors = next(iter(data["string_to_param"].values()))
    elif embed_key in data:
        vectors = data[embed_key]
    else:
        vectors = next(iter(data.values()))
    vectors = vectors.reshape(-1, vectors.shape[-1])
    return vectors if vectors.shape[-1] == embedding_size else None


# --- LoRA key rules ---------------------------------------------------------------------------------------------

_A1111_RESNET_SUFFIXES = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def _a1111_block_name(key: str) -> str | None:
    import re

    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        suffix = _A1111_RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + block * 3 + index}_{1 if kind == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, index, rest = m[1], int(m[2]), m[3]
        suffix = _A1111_RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else index * 2}_{suffix}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        suffix = _A1111_RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{block * 3 + index}_{1 if kind == 'attentions' else 0}_{suffix}"
    return None


def a1111_compvis_name(key: str) -> str:
    """A1111's `convert_diffusers_name_to_compvis` for SD1.x kohya keys (module part, without `.lora_up.weight`)."""
    import re

    if name := _a1111_block_name(key):
        return name
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


def a1111_layer_names(checkpoint_keys, text_root: str = "cond_stage_model.") -> set[str]:
    """A1111's `network_layer_mapping` names of a checkpoint: module paths with `_`, relative to `sd_model.model`
    (UNet: `diffusion_model_...`) and to the text encoders' root (SD1.x: the CLIP wrapper, `transformer_...`; SDXL:
    `conditioner.embedders.`, so each embedder's index leads: `0_transformer_...`, `1_model_transformer_...`)."""
    names = set()
    for key in checkpoint_keys:
        module = key.rsplit(".", 1)[0]
        if module.startswith("model.diffusion_model."):
            names.add(module.removeprefix("model.").replace(".", "_"))
        elif module.startswith(text_root):
            names.add(module.removeprefix(text_root).replace(".", "_"))
    return names


def a1111_unmatched_keys(lora_keys, checkpoint_keys) -> list[str]:
    """LoRA modules A1111 would log as "didn't match keys" (and silently not apply)."""
    layers = a1111_layer_names(checkpoint_keys)
    modules = {key.split(".", 1)[0] for key in lora_keys}
    return sorted(m for m in modules if a1111_compvis_name(m) not in layers)


_COMFY_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def comfyui_key_map(diffusers_unet_weight_names, ldm_unet_keys, num_text_layers: int) -> set[str]:
    """The kohya module names ComfyUI maps for an SD1.x model: `lora_unet_` + LDM or diffusers weight paths, and
    `lora_te_text_model_encoder_layers_<i>_<mlp_fc1|...>` for the six CLIP layer types."""
    names = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in diffusers_unet_weight_names}
    names |= {
        "lora_unet_" + k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
        for k in ldm_unet_keys
    }
    for layer in range(num_text_layers):
        names |= {f"lora_te_text_model_encoder_layers_{layer}_{suffix}" for suffix in _COMFY_CLIP_MAP.values()}
    return names


def comfyui_unloaded_keys(lora_keys, key_map: set[str]) -> list[str]:
    """Keys ComfyUI reports as "lora key not loaded": those of no mapped module, or not up/down/alpha/mid."""
    parts = (".lora_up.weight", ".lora_down.weight", ".alpha", ".lora_mid.weight")
    left = []
    for key in lora_keys:
        module = next((key[: -len(p)] for p in parts if key.endswith(p)), None)
        if module is None or module not in key_map:
            left.append(key)
    return sorted(left)


# --- SDXL -------------------------------------------------------------------------------------------------------


def comfyui_sdxl_key_map(ldm_unet_keys, clip_l_layers: int, clip_g_layers: int) -> set[str]:
    """The kohya module names ComfyUI maps for an SDXL model (comfy/lora.py): `lora_unet_` + every LDM weight path,
    `lora_te1_text_model_encoder_layers_<i>_<...>` for CLIP-L and `lora_te2_...` for CLIP-G (when CLIP-L exists)."""
    names = {
        "lora_unet_" + k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
        for k in ldm_unet_keys
        if k.endswith(".weight")
    }
    for prefix, layers in (("lora_te1", clip_l_layers), ("lora_te2", clip_g_layers)):
        for layer in range(layers):
            names |= {f"{prefix}_text_model_encoder_layers_{layer}_{suffix}" for suffix in _COMFY_CLIP_MAP.values()}
    return names


def _a1111_sdxl_name(module: str, layers: set[str]) -> str | None:
    """The `network_layer_mapping` entry A1111 finds for an SDXL kohya module name (networks.py: convert the te2
    names to OpenCLIP's, try them, then an `_[qkv]_proj` name's attention module, then `lora_unet` ->
    `diffusion_model` and `lora_te1_text_model` -> `0_transformer_text_model`), or None."""
    import re

    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", module):
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        module = f"1_model_transformer_resblocks_{m[1]}_{rest}"
    if module in layers:
        return module
    if (m := re.match(r"(.*)_([qkv]_proj)$", module)) and m[1] in layers:
        return m[1]
    for kohya, compvis in (("lora_unet", "diffusion_model"), ("lora_te1_text_model", "0_transformer_text_model")):
        if module.startswith(kohya) and module.replace(kohya, compvis, 1) in layers:
            return module.replace(kohya, compvis, 1)
    return None


def a1111_sdxl_unmatched_keys(lora_keys, checkpoint_keys) -> list[str]:
    """SDXL LoRA modules A1111 would not apply: names it does not match, and OpenCLIP (te2) attention parts of a
    layer that lacks any of q, k, v and out (A1111 patches a MultiheadAttention only with all four)."""
    layers = a1111_layer_names(checkpoint_keys, "conditioner.embedders.")
    modules = {key.split(".", 1)[0] for key in lora_keys}
    unmatched = [m for m in modules if _a1111_sdxl_name(m, layers) is None]
    return sorted(unmatched + _a1111_incomplete_open_clip_attention(modules, "lora_te2_"))


def _a1111_incomplete_open_clip_attention(modules, prefix: str) -> list[str]:
    """The attention parts of OpenCLIP layers (kohya names under `prefix`) that lack any of q, k, v and out: A1111
    patches an OpenCLIP `MultiheadAttention` only with all four."""
    attention: dict[str, set[str]] = {}
    for module in modules:
        if module.startswith(prefix) and "_self_attn_" in module:
            layer, _, part = module.rpartition("_self_attn_")
            attention.setdefault(layer, set()).add(part)
    return [
        f"{layer}_self_attn_{part}"
        for layer, parts in attention.items()
        if parts != {"q_proj", "k_proj", "v_proj", "out_proj"}
        for part in parts
    ]


# --- SD2.x ------------------------------------------------------------------------------------------------------


def _a1111_sd2_name(module: str, layers: set[str]) -> str | None:
    """The `network_layer_mapping` entry A1111 finds for an SD2.x kohya module name (networks.py
    `convert_diffusers_name_to_compvis(key, is_sd2=True)`: UNet names as SD1.x's, text-encoder names onto OpenCLIP's
    `model_transformer_resblocks_<i>_{attn,mlp_c_fc,mlp_c_proj}`; then an `_[qkv]_proj` name's attention module)."""
    import re

    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", module):
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        name = f"model_transformer_resblocks_{m[1]}_{rest}"
    else:
        name = a1111_compvis_name(module)
    if name in layers:
        return name
    if (m := re.match(r"(.*)_([qkv]_proj)$", name)) and m[1] in layers:
        return m[1]
    return None


def a1111_sd2_unmatched_keys(lora_keys, checkpoint_keys) -> list[str]:
    """SD2.x LoRA modules A1111 would not apply: names it does not match, and OpenCLIP attention parts of a layer
    that lacks any of q, k, v and out (A1111 patches a MultiheadAttention only with all four)."""
    layers = a1111_layer_names(checkpoint_keys)  # relative to the OpenCLIP wrapper: `model_transformer_...`
    modules = {key.split(".", 1)[0] for key in lora_keys}
    unmatched = [m for m in modules if _a1111_sd2_name(m, layers) is None]
    return sorted(unmatched + _a1111_incomplete_open_clip_attention(modules, "lora_te_"))
