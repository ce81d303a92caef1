"""Hand-made third-party-style artifacts for the tiny base (the layouts of shared/FORMATS.md), and the reference
weights they define, for inference and generation tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdtune import formats

UNET_MODULES = (
    "lora_unet_down_blocks_1_attentions_0_proj_in",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q",
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0",
)
TEXT_MODULES = tuple(  # kohya's text-encoder targets, for two layers
    f"lora_te_text_model_encoder_layers_{layer}_{module}"
    for layer in (0, 3)
    for module in (
        "self_attn_q_proj",
        "self_attn_k_proj",
        "self_attn_v_proj",
        "self_attn_out_proj",
        "mlp_fc1",
        "mlp_fc2",
    )
)


def kohya_lora(base, path: Path, seed: int, names=UNET_MODULES + TEXT_MODULES, rank=2, alpha=1.0, metadata=None):
    """Writes a kohya-layout LoRA with random (non-zero) factors for `names`; returns {name: (down, up, alpha)}."""
    key_map = formats.module_key_map(base.family, base.adaptable())
    generator = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for name in names:
        weight = key_map[name][2].weight
        down = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.3
        up = torch.randn(weight.shape[0], rank, *([1] * (weight.dim() - 2)), generator=generator) * 0.3
        tensors |= {name + formats.DOWN: down, name + formats.UP: up, name + formats.ALPHA: torch.tensor(alpha)}
        factors[name] = (down, up, alpha)
    save_file(tensors, str(path), metadata=metadata)
    return factors


def apply_reference(base, stack: list[tuple[dict, float, float]]):
    """Copies of the base's (unet, text_encoder) with `W + m * (alpha / r) * up @ down` added per LoRA (FORMATS.md),
    `stack` = [(factors, text_encoder_weight, unet_weight), ...]."""
    unet, text_encoder = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    key_map = formats.module_key_map(base.family, {"unet": unet, "text_encoder": text_encoder})
    with torch.no_grad():
        for factors, text_encoder_weight, unet_weight in stack:
            for name, (down, up, alpha) in factors.items():
                component, _, module = key_map[name]
                strength = unet_weight if component == "unet" else text_encoder_weight
                delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
                module.weight += strength * (alpha / down.shape[0]) * delta
    return unet, text_encoder


def a1111_embedding(path: Path, vectors: torch.Tensor, name: str = "myemb") -> None:
    """A1111's own `.pt` layout (string_to_param with one entry)."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors},
            "name": name,
            "step": 100,
            "sd_checkpoint": "0123456789",
            "sd_checkpoint_name": "some-model",
        },
        path,
    )
