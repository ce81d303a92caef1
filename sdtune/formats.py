"""File layouts shared by training, export, inspection and inference (see shared/FORMATS.md).

kohya LoRA keys: `<prefix><module path with "." -> "_">.{lora_down.weight, lora_up.weight, alpha}`. For SD1.x/SD2.x
the UNet prefix is `lora_unet_` with the diffusers module path; the text encoder's is `lora_te_text_model_` with the
path inside CLIP's `text_model` (transformers >= 5 has no `text_model` level in `named_modules()`, so that level is
added here explicitly rather than derived).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_text_model_"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
LORA_SUFFIXES = (DOWN, UP, ALPHA)
EMBEDDING_KEYS = ("emb_params", "string_to_param", "clip_l", "clip_g")


class FormatError(Exception):
    """A file that is not in the layout it claims, or that does not fit the model it is checked against."""


def unet_module_key(module_path: str) -> str:
    """kohya name of a UNet module, e.g. `down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_...`."""
    return UNET_PREFIX + module_path.replace(".", "_")


def text_encoder_module_key(module_path: str) -> str:
    """kohya name of a CLIP text-encoder module, with the `text_model` level whatever transformers' version."""
    return TEXT_ENCODER_PREFIX + module_path.removeprefix("text_model.").replace(".", "_")


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> module for every Linear and Conv2d (the layers a LoRA can adapt), ignoring adapter internals."""
    found = {}
    for path, module in model.named_modules():
        if any(part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") for part in path.split(".")):
            continue
        base = getattr(module, "base_layer", None)
        if isinstance(base, (nn.Linear, nn.Conv2d)):
            found[path] = base
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and not path.endswith(".base_layer"):
            found[path] = module
    return found


def module_key_map(unet: nn.Module, text_encoder: nn.Module) -> dict[str, tuple[str, str, nn.Module]]:
    """kohya key -> (component, module path, module) for every adaptable module of an SD1.x/SD2.x model."""
    keys = {unet_module_key(path): ("unet", path, module) for path, module in adaptable_modules(unet).items()}
    for path, module in adaptable_modules(text_encoder).items():
        keys[text_encoder_module_key(path)] = ("text_encoder", path, module)
    return keys


@dataclass
class LoraModule:
    """One adapted module of a LoRA file: factors and alpha as stored."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        """The rank, `lora_down.shape[0]`."""
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """`(alpha / rank) * up @ down`, shaped like the adapted weight (`[out, in]` or `[out, in, kh, kw]`)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        product = up @ down
        if self.down.ndim == 4:
            product = product.reshape(self.up.shape[0], *self.down.shape[1:])
        return product * (self.alpha / self.rank)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a `.safetensors` file.

    Raises:
        FormatError: The file cannot be read as safetensors.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not iterable)
            return tensors, dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises several error types for damaged files
        raise FormatError(f"{path}: not a readable .safetensors file ({error}).") from error


def is_kohya_lora(keys) -> bool:
    """True when the keys are kohya LoRA keys (`lora_unet_*` / `lora_te*_*`)."""
    return any(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in keys)


def parse_kohya_lora(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, LoraModule]:
    """Groups a kohya LoRA state dict by module.

    Raises:
        FormatError: Keys of other layouts, a module missing a factor, or factors of mismatching rank.
    """
    modules, problems = {}, []
    names = {key[: -len(suffix)] for key in tensors for suffix in LORA_SUFFIXES if key.endswith(suffix)}
    stray = sorted(key for key in tensors if not any(key.endswith(s) for s in LORA_SUFFIXES))
    if stray:
        problems.append(f"keys that are not kohya LoRA keys: {', '.join(stray[:5])}")
    for name in sorted(names):
        down, up = tensors.get(name + DOWN), tensors.get(name + UP)
        if down is None or up is None:
            problems.append(f"{name} lacks its {'lora_down' if down is None else 'lora_up'} weight")
            continue
        if down.shape[0] != up.shape[1]:
            problems.append(f"{name}: lora_down rank {down.shape[0]} != lora_up rank {up.shape[1]}")
            continue
        alpha = tensors.get(name + ALPHA)
        modules[name] = LoraModule(down=down, up=up, alpha=float(alpha) if alpha is not None else float(down.shape[0]))
    if problems:
        raise FormatError(f"{path}: " + "; ".join(problems) + ".")
    return modules


PEFT_COMPONENT_KEYS = {"unet": unet_module_key, "text_encoder": text_encoder_module_key}


def parse_peft_lora(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, LoraModule]:
    """A diffusers/peft LoRA state dict (`unet.<path>.lora_A.weight`, `text_encoder.<path>.lora_B.weight`) as kohya
    names -> factors, so it is checked against a base model like a kohya file (alpha = rank: peft keeps it in the
    adapter config, not the weights).

    Raises:
        FormatError: Keys of other components or layouts, or a module missing a factor.
    """
    factors: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        module_path, _, factor = rest.rpartition(".lora_")
        if component not in PEFT_COMPONENT_KEYS or factor not in ("A.weight", "B.weight"):
            problems.append(f"{key} is not a diffusers LoRA key of the UNet or text encoder")
            continue
        name = PEFT_COMPONENT_KEYS[component](module_path)
        factors.setdefault(name, {})[factor[0]] = tensor
    modules = {}
    for name, pair in sorted(factors.items()):
        if len(pair) != 2:
            problems.append(f"{name} lacks its lora_{'B' if 'A' in pair else 'A'} weight")
            continue
        modules[name] = LoraModule(down=pair["A"], up=pair["B"], alpha=float(pair["A"].shape[0]))
    if problems:
        raise FormatError(f"{path}: " + "; ".join(problems[:5]) + ".")
    return modules


def lora_fit_problems(modules: dict[str, LoraModule], key_map: dict[str, tuple[str, str, nn.Module]]) -> list[str]:
    """Keys that name no module of the model, and factors whose shapes do not fit the module they name."""
    problems = []
    unknown = sorted(name for name in modules if name not in key_map)
    if unknown:
        listed = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        problems.append(f"{len(unknown)} key(s) name no module of the base model: {listed}")
    for name, lora in modules.items():
        if name not in key_map:
            continue
        weight = key_map[name][2].weight
        # Every client computes (up.flatten(1) @ down.flatten(1)).reshape(W.shape): the flattened sizes must agree.
        if lora.down.flatten(1).shape[1] != weight.flatten(1).shape[1] or lora.up.shape[0] != weight.shape[0]:
            problems.append(
                f"{name}: lora_down {tuple(lora.down.shape)} / lora_up {tuple(lora.up.shape)} do not fit the "
                f"module's weight {tuple(weight.shape)}"
            )
    return problems
