"""LoRA: low-rank updates `W + (alpha / r) * B @ A` on frozen layers (Hu et al. 2021, arXiv:2106.09685).

Layers are wrapped with peft (the original layer stays as `base_layer`, frozen and untouched). Targets follow kohya
sd-scripts so the files mean the same in every client:
- UNet `kohya` preset: every Linear and 1x1 Conv2d inside each `Transformer2DModel` (proj_in/out, attn1/attn2
  q/k/v/out, ff); `attention` preset: the attention projections only; `cross_attention` preset: the projections of
  `attn2`, the attention that reads the text (as Custom Diffusion, Kumari et al. 2023, adapts only there).
- LoCon (`conv_rank`): also the Conv2d layers of `ResnetBlock2D`, `Downsample2D`, `Upsample2D` (3x3 convs at
  `conv_rank`/`conv_alpha`, the 1x1 shortcut at `lora_rank`/`lora_alpha`).
- Text encoder `kohya` preset: q/k/v/out projections and fc1/fc2 of every layer; the other presets: q/k/v/out.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sdtune import families, formats
from sdtune.config import ConfigError, TrainConfig
from sdtune.families import Family

ADAPTER = "default"
_UNET_TRANSFORMER_CLASSES = ("Transformer2DModel",)
_UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TEXT_LAYER_CLASSES = ("CLIPEncoderLayer",)


@dataclass
class LoraPlan:
    """Which modules get a LoRA, at which (rank, alpha), per component (`unet`, the text encoders), and optional
    starting factors (continuing a file)."""

    targets: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)
    initial: dict[str, formats.LoraModule] | None = None


def _inside(model: nn.Module, class_names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """(path, module) of every Linear/Conv2d inside a module whose class is one of `class_names`."""
    found = []
    for parent_path, parent in model.named_modules():
        if type(parent).__name__ not in class_names:
            continue
        for child_path, child in parent.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)) and child_path:
                found.append((f"{parent_path}.{child_path}", child))
    return found


def _is_1x1(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or tuple(module.kernel_size) == (1, 1)


def unet_targets(unet: nn.Module, preset: str, rank: int, alpha: float, conv: tuple[int, float] | None) -> dict:
    """Module path -> (rank, alpha) of the UNet layers a preset adapts.

    Args:
        unet: The diffusers UNet.
        preset: `kohya` (all Linear / 1x1 conv in transformer blocks), `attention` (attention projections),
            `cross_attention` (the text-reading `attn2` projections) or `cross_attention_kv` (only `attn2`'s key
            and value projections, which read the text states: Custom Diffusion, Kumari et al. 2023).
        rank: Rank of Linear and 1x1 conv layers.
        alpha: Their alpha.
        conv: (rank, alpha) of the LoCon 3x3 convs, or None for no LoCon.
    """
    targets = {}
    for path, module in _inside(unet, _UNET_TRANSFORMER_CLASSES):
        if not _is_1x1(module):
            continue
        if preset == "attention" and not re.search(r"\.attn[12]\.", path):
            continue
        if preset == "cross_attention" and ".attn2." not in path:
            continue
        if preset == "cross_attention_kv" and not re.search(r"\.attn2\.to_[kv]$", path):
            continue
        targets[path] = (rank, alpha)
    if conv is not None:
        for path, module in _inside(unet, _UNET_CONV_CLASSES):
            if isinstance(module, nn.Conv2d):
                targets[path] = (rank, alpha) if _is_1x1(module) else conv
    return targets


def text_encoder_targets(text_encoder: nn.Module, preset: str, rank: int, alpha: float) -> dict:
    """Module path -> (rank, alpha) of the CLIP text-encoder layers a preset adapts (`kohya`: all; else attention)."""
    targets = {}
    for path, module in _inside(text_encoder, _TEXT_LAYER_CLASSES):
        if isinstance(module, nn.Linear) and (preset == "kohya" or ".self_attn." in path):
            targets[path] = (rank, alpha)
    return targets


def inject(model: nn.Module, targets: dict[str, tuple[int, float]]) -> list[nn.Parameter]:
    """Wraps the target layers with peft LoRA layers (A kaiming-uniform, B zero, as kohya) and returns the new params.

    Raises:
        ValueError: No targets, or a target path that is not a module of the model.
    """
    from peft import LoraConfig, inject_adapter_in_model  # peft takes seconds to import: not on `sdtune validate`

    if not targets:
        raise ValueError(f"no LoRA target modules were found in the {type(model).__name__}.")
    modules = dict(model.named_modules())
    missing = [path for path in targets if path not in modules]
    if missing:
        raise ValueError(f"LoRA targets not found in the {type(model).__name__}: {', '.join(missing[:5])}")
    default_rank, default_alpha = next(iter(targets.values()))
    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        target_modules=sorted(targets),
        rank_pattern={re.escape(path): rank for path, (rank, _) in targets.items()},
        alpha_pattern={re.escape(path): alpha for path, (_, alpha) in targets.items()},
        init_lora_weights=True,
        lora_dropout=0.0,
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    return [p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]


@contextmanager
def adapters_disabled(*models: nn.Module):
    """Within the block, the models compute as the base model (LoRA layers bypassed); trainability is kept."""
    layers = [layer for model in models for _, layer in _lora_layers(model)]
    trainable = {param: param.requires_grad for layer in layers for param in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, requires_grad in trainable.items():  # peft's enable_adapters re-enables gradients
            param.requires_grad_(requires_grad)


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield path, module


def extract(family: Family, components: dict[str, nn.Module]) -> dict[str, formats.LoraModule]:
    """The current LoRA factors of the components (`unet`, text encoders) under their kohya names (detached float32
    CPU copies)."""
    unet_config = getattr(components.get("unet"), "config", None)
    modules = {}
    for component, model in components.items():
        for path, layer in _lora_layers(model):
            modules[formats.lora_key(family, component, path, unet_config)] = formats.LoraModule(
                down=layer.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
                up=layer.lora_B[ADAPTER].weight.detach().float().cpu().clone(),
                alpha=float(layer.lora_alpha[ADAPTER]),
            )
    return modules


def load_factors(family: Family, components: dict[str, nn.Module], modules: dict[str, formats.LoraModule]) -> None:
    """Copies factors (e.g. from a LoRA file) into already injected LoRA layers.

    Raises:
        ValueError: A module of the file has no injected layer, or an injected layer none in the file.
    """
    unet_config = getattr(components.get("unet"), "config", None)
    layers = {
        formats.lora_key(family, component, path, unet_config): layer
        for component, model in components.items()
        for path, layer in _lora_layers(model)
    }
    if set(layers) != set(modules):
        raise ValueError(f"LoRA layers and file differ: {sorted(set(layers) ^ set(modules))[:5]}")
    with torch.no_grad():
        for key, lora in modules.items():
            layers[key].lora_A[ADAPTER].weight.copy_(lora.down.reshape(layers[key].lora_A[ADAPTER].weight.shape))
            layers[key].lora_B[ADAPTER].weight.copy_(lora.up.reshape(layers[key].lora_B[ADAPTER].weight.shape))


def plan_from_modules(
    modules: dict[str, formats.LoraModule], key_map: dict[str, tuple[str, str, nn.Module]]
) -> LoraPlan:
    """A plan that recreates the modules, ranks and alphas of a LoRA file (keys must be checked to fit first)."""
    plan = LoraPlan(initial=modules)
    for key, lora in modules.items():
        component, path, _ = key_map[key]
        plan.targets.setdefault(component, {})[path] = (lora.rank, lora.alpha)
    return plan


def _is_conv3x3(lora: formats.LoraModule) -> bool:
    return lora.down.ndim == 4 and tuple(lora.down.shape[-2:]) != (1, 1)


def _mismatch(name: str, wanted, found: set, path: Path) -> str | None:
    if wanted is None or found <= {wanted}:
        return None
    shown = ", ".join(f"{value:g}" for value in sorted(found))
    return (
        f"{name}: {wanted:g} but network_weights {path.name} has {shown}; remove {name} (the file decides) or "
        "start a new LoRA without network_weights."
    )


def file_config_problems(path: Path, config: TrainConfig, family: Family) -> list[str]:
    """Reads a LoRA file to continue from and lists what contradicts the config (cheap: no model is loaded).

    Rank, alpha and the trained components come from the file; a config that sets them differently is an error.
    """
    text_prefixes = tuple(encoder.kohya_prefix for encoder in family.text_encoders)
    if path.suffix != ".safetensors":
        return [f"network_weights: {path} is not a .safetensors file; sdtune continues from .safetensors LoRAs only."]
    try:
        tensors, _ = formats.read_safetensors(path)
        if not formats.is_kohya_lora(tensors):
            names = " / ".join(f"{prefix}*" for prefix in (families.KOHYA_UNET_PREFIX, *text_prefixes))
            return [f"network_weights: {path} is not a kohya-format LoRA (no {names} keys)."]
        modules = formats.parse_kohya_lora(tensors, path)
    except formats.FormatError as error:
        return [f"network_weights: {error}"]
    plain = [lora for lora in modules.values() if not _is_conv3x3(lora)]
    convs = [lora for lora in modules.values() if _is_conv3x3(lora)]
    problems = [
        _mismatch("lora_rank", config.lora_rank, {lora.rank for lora in plain}, path),
        _mismatch("lora_alpha", config.lora_alpha, {lora.alpha for lora in plain}, path),
        _mismatch("conv_rank", config.conv_rank, {lora.rank for lora in convs}, path),
        _mismatch("conv_alpha", config.conv_alpha, {lora.alpha for lora in convs}, path),
    ]
    if config.conv_rank is not None and not convs:
        problems.append(f"conv_rank: network_weights {path.name} has no LoCon convs; remove conv_rank.")
    for flag, prefixes in (("train_unet", (families.KOHYA_UNET_PREFIX,)), ("train_text_encoder", text_prefixes)):
        present = any(key.startswith(prefixes) for key in modules)
        if getattr(config, flag) is not None and getattr(config, flag) != present:
            problems.append(
                f"{flag}: {str(getattr(config, flag)).lower()} but network_weights {path.name} "
                f"{'has' if present else 'has no'} {' / '.join(p + '*' for p in prefixes)} modules; remove {flag} "
                "(the file decides)."
            )
    return [problem for problem in problems if problem]


def plan_for(config: TrainConfig, family: Family, components: dict[str, nn.Module]) -> LoraPlan:
    """The LoRA plan of a config for the components (`unet`, text encoders): from `network_weights` when set, else
    from the presets.

    Raises:
        ConfigError: The file does not fit this base model, or a preset matched no module.
    """
    if config.network_weights:
        return _file_plan(config, family, components)
    plan = _preset_plan(config, components, config.train_unet is not False, config.train_text_encoder is not False)
    if not any(plan.targets.values()):
        raise ConfigError(["lora_targets: matched no module of the base model."], "LoRA targets")
    return plan


def _file_plan(config: TrainConfig, family: Family, components: dict[str, nn.Module]) -> LoraPlan:
    """The plan that recreates `network_weights`, after checking it fits the components and `lora_targets`."""
    path = Path(config.network_weights)
    modules = formats.parse_kohya_lora(formats.read_safetensors(path)[0], path)
    problems = formats.lora_fit_problems(modules, formats.module_key_map(family, components, other_spelling=True))
    unet_config = getattr(components.get("unet"), "config", None)
    modules = formats.canonical_names(
        family, modules, formats.module_key_map(family, components, other_spelling=True), unet_config
    )  # what this run writes: the family's own spelling
    key_map = formats.module_key_map(family, components)
    problems += [] if problems else formats.open_clip_attention_problems(family, modules, key_map)
    if not problems and config.lora_targets is not None:
        preset = _preset_plan(config, components, include_unet=True, include_text=True)
        expected = {
            formats.lora_key(family, component, module_path, unet_config)
            for component, targets in preset.targets.items()
            for module_path in targets
        }
        if set(modules) - expected:
            problems.append(
                f"lora_targets: {config.lora_targets!r} does not cover the file's modules "
                f"(e.g. {sorted(set(modules) - expected)[0]}); remove lora_targets (the file decides)"
            )
    if problems:
        raise ConfigError(problems, f"network_weights {path}")
    return plan_from_modules(modules, key_map)


def _preset_plan(config: TrainConfig, components: dict[str, nn.Module], include_unet: bool, include_text: bool):
    preset = config.lora_targets or "kohya"
    rank, alpha = config.effective_lora_rank, config.effective_lora_alpha
    targets = {}
    for component, model in components.items():
        if component == "unet" and include_unet:
            targets[component] = unet_targets(model, preset, rank, alpha, config.conv)
        elif component != "unet" and include_text:
            targets[component] = text_encoder_targets(model, preset, rank, alpha)
    return LoraPlan(targets=targets)


def _most_common(values: list):
    return max(set(values), key=values.count) if values else None


def main_rank(*models: nn.Module) -> int | None:
    """The rank most Linear / 1x1 layers use (what kohya records as `ss_network_dim`)."""
    layers = [layer for model in models for _, layer in _lora_layers(model)]
    return _most_common([layer.r[ADAPTER] for layer in layers if _is_1x1(layer.get_base_layer())])


def conv_settings(*models: nn.Module) -> tuple[int, float] | None:
    """(rank, alpha) most of the adapted 3x3 convs (LoCon) use, as kohya records them in `ss_network_args`
    (`conv_dim`, `conv_alpha`); None without LoCon convs. Read from the modules, so a LoRA continued from a LoCon file
    records what it holds."""
    layers = [layer for model in models for _, layer in _lora_layers(model) if not _is_1x1(layer.get_base_layer())]
    if not layers:
        return None
    rank = _most_common([layer.r[ADAPTER] for layer in layers])
    return rank, _most_common([float(layer.lora_alpha[ADAPTER]) for layer in layers])


def main_alpha(*models: nn.Module) -> float | None:
    """The alpha most Linear / 1x1 layers use (`ss_network_alpha`)."""
    layers = [layer for model in models for _, layer in _lora_layers(model)]
    return _most_common([float(layer.lora_alpha[ADAPTER]) for layer in layers if _is_1x1(layer.get_base_layer())])
