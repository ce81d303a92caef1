"""File layouts, both ways: the kohya key names sdtune writes, and reading any LoRA or embedding file (ours and other
tools') into what it holds and which family it fits (see shared/FORMATS.md).

kohya LoRA keys: `<prefix><module path with "." -> "_">.{lora_down.weight, lora_up.weight, alpha}`. The UNet prefix
is `lora_unet_` with the module path spelled as the family says (diffusers paths for SD1.x/SD2.x, original LDM paths
for SDXL); a text encoder's is the `kohya_prefix` of its family record, then `text_model_` and the path inside
CLIP's `text_model` (transformers >= 5 has no `text_model` level in `named_modules()`, so that level is added
here explicitly rather than derived, FORMATS.md rule 2).

Used by training, export, `sdtune inspect` and inference; it never imports training code.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sdtune import checkpoint_keys, families
from sdtune.errors import SdtuneError
from sdtune.families import Family

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
LORA_SUFFIXES = (DOWN, UP, ALPHA)
RECORD_PREFIX = "sdtune."


class FormatError(SdtuneError):
    """A file that is not in the layout it claims, or that does not fit the model it is checked against."""


# ---------------------------------------------------------------------------------------------------------------
# kohya names of modules


def lora_key(family: Family, component: str, module_path: str, unet_config=None) -> str:
    """kohya name of a module of `component` (`unet` or one of the family's text encoders).

    Args:
        family: The base model's family (key spelling and prefixes).
        component: The pipeline attribute the module belongs to.
        module_path: Its path in that component, e.g. `down_blocks.0.attentions.0.proj_in`.
        unet_config: The UNet's config; needed for families that spell UNet keys the LDM way.
    """
    if component == "unet":
        if family.unet_key_style == "ldm":
            module_path = checkpoint_keys.unet_module_to_ldm(module_path, unet_config)
        return families.KOHYA_UNET_PREFIX + module_path.replace(".", "_")
    prefix = family.text_encoder(component).kohya_prefix
    return prefix + "text_model_" + module_path.removeprefix("text_model.").replace(".", "_")


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


def module_key_map(
    family: Family, components: dict[str, nn.Module], other_spelling: bool = False
) -> dict[str, tuple[str, str, nn.Module]]:
    """kohya key -> (component, module path, module) for every adaptable module of the components (`unet` and
    text encoders by pipeline attribute name, e.g. `BaseModel.adaptable()`).

    With `other_spelling`, the UNet modules of an LDM-spelled family (SDXL) also answer to their diffusers paths:
    other trainers write SDXL files so, and every client reads them. (The reverse is not offered: diffusers' SD1.x
    loader cannot read LDM-spelled SD1.x files, FORMATS.md rule 1.)
    """
    unet_config = getattr(components.get("unet"), "config", None)
    spellings = [family]
    if other_spelling and family.unet_key_style == "ldm":
        spellings.append(dataclasses.replace(family, unet_key_style="diffusers"))
    keys = {}
    for component, model in components.items():
        for path, module in adaptable_modules(model).items():
            for spelling in spellings if component == "unet" else spellings[:1]:
                keys.setdefault(lora_key(spelling, component, path, unet_config), (component, path, module))
    return keys


def canonical_names(family: Family, modules: dict, key_map: dict, unet_config=None) -> dict:
    """`modules` (kohya key -> anything) under the names the family writes, read through `key_map` (which may map
    other spellings, see `module_key_map`); keys naming no module stay as they are."""
    renamed = {}
    for key, value in modules.items():
        component, path = key_map[key][:2] if key in key_map else (None, None)
        renamed[lora_key(family, component, path, unet_config) if component else key] = value
    return renamed


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


# ---------------------------------------------------------------------------------------------------------------
# Reading LoRA files


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a `.safetensors` LoRA or embedding file (every tensor finite).

    Raises:
        FormatError: The file cannot be read as safetensors, or holds NaN / infinite values.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not iterable)
            metadata = dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises several error types for damaged files
        raise FormatError(f"{path}: not a readable .safetensors file ({error}).") from error
    check_finite(tensors, path)
    return tensors, metadata


def is_lora(keys) -> bool:
    """True when the keys are a LoRA layout sdtune reads: kohya (`is_kohya_lora`) or diffusers/peft (`.lora_A.`)."""
    keys = list(keys)
    return is_kohya_lora(keys) or any(".lora_A." in key for key in keys)


def is_kohya_lora(keys) -> bool:
    """True when the keys are kohya LoRA keys (`lora_unet_*` or a known text-encoder prefix)."""
    prefixes = (families.KOHYA_UNET_PREFIX, *families.kohya_text_prefixes())
    return any(key.startswith(prefixes) for key in keys)


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


def _peft_family(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Family | None:
    """The family whose names a diffusers-layout LoRA is read with: the one it records, else the first family sdtune
    trains on that has every component the file adapts."""
    recorded = families.get(metadata.get("sdtune.model_family"))
    if recorded:
        return recorded
    components = {key.partition(".")[0] for key in tensors}
    for family in families.FAMILIES.values():
        if components <= {"unet", *(encoder.component for encoder in family.text_encoders)}:
            return family
    return None


def parse_peft_lora(tensors: dict[str, torch.Tensor], path: Path, family: Family | None) -> dict[str, LoraModule]:
    """A diffusers/peft LoRA state dict (`unet.<path>.lora_A.weight`, `text_encoder.<path>.lora_B.weight`) as kohya
    names -> factors (named as `family` names them), so it is checked against a base model like a kohya file (alpha =
    rank: peft keeps it in the adapter config, not the weights).

    Raises:
        FormatError: Keys of other components or layouts, or a module missing a factor.
    """
    components = ("unet", *(encoder.component for encoder in family.text_encoders)) if family else ()
    unet_config = families.shipped_configs(family)["unet"] if family and family.unet_key_style == "ldm" else None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        module_path, _, factor = rest.rpartition(".lora_")
        if component not in components or factor not in ("A.weight", "B.weight"):
            problems.append(f"{key} is not a diffusers LoRA key of the UNet or a text encoder sdtune knows")
            continue
        name = lora_key(family, component, module_path, unet_config)
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


def open_clip_attention_problems(family: Family, modules, key_map: dict) -> list[str]:
    """Layers of an OpenCLIP text encoder (`checkpoint_layout: open_clip`: SD2.x's, SDXL's second) whose attention
    holds a LoRA on some of q, k, v and out but not all: A1111 runs OpenCLIP natively and applies such a layer's
    attention LoRA only when all four are there (networks.py), so a subset would silently do nothing in it."""
    open_clip = {encoder.component for encoder in family.text_encoders if encoder.checkpoint_layout == "open_clip"}
    found: dict[tuple[str, int], set[str]] = {}
    for key in modules:
        component, path = key_map[key][:2] if key in key_map else (None, "")
        if component in open_clip and (m := re.search(r"layers\.(\d+)\.self_attn\.(q|k|v|out)_proj$", path)):
            found.setdefault((component, int(m[1])), set()).add(m[2])
    return [
        f"{component} layer {layer}: attention LoRA on {', '.join(sorted(parts))} only; A1111 applies an OpenCLIP "
        "encoder's attention LoRA only when q, k, v and out are all present, so it would silently do nothing there "
        "(train all four, as every sdtune preset does, or none)"
        for (component, layer), parts in sorted(found.items())
        if parts != {"q", "k", "v", "out"}
    ]


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


# ---------------------------------------------------------------------------------------------------------------
# Reading any artifact: what a file is, and which family it fits


def recorded_prediction_type(metadata: dict[str, str] | None) -> tuple[str | None, str]:
    """(`epsilon` or `v_prediction`, the header key that says it) of the base model a file was made on, or
    (None, "") when its header does not say: sdtune's record, ModelSpec, kohya's `ss_v_parameterization` or its
    `ss_base_model_version` (`sd_v2_v`)."""
    metadata = metadata or {}
    spec = {"v": "v_prediction", "epsilon": "epsilon"}.get(metadata.get("modelspec.prediction_type", ""))
    kohya = {"True": "v_prediction", "False": "epsilon"}.get(metadata.get("ss_v_parameterization", ""))
    version = metadata.get("ss_base_model_version", "")
    named = "v_prediction" if version.startswith("sd_v") and version.endswith("_v") else None
    for key, value in (
        ("sdtune.prediction_type", metadata.get("sdtune.prediction_type")),
        ("modelspec.prediction_type", spec),
        ("ss_v_parameterization", kohya),
        ("ss_base_model_version", named),
    ):
        if value:
            return value, key
    return None, ""


def read_record(metadata: dict[str, str] | None) -> dict[str, str]:
    """The `sdtune.*` entries of a safetensors header (empty for files made by other tools)."""
    return {key: value for key, value in (metadata or {}).items() if key.startswith(RECORD_PREFIX)}


@dataclass
class Artifact:
    """What a LoRA or embedding file holds, as far as its keys, shapes and header tell."""

    path: Path
    kind: str  # "lora" or "embedding"
    layout: str  # kohya, diffusers-peft, emb_params, a1111-pt, sdxl-pair, single-key
    family: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    lora_modules: dict[str, LoraModule] = field(default_factory=dict)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)  # file key ("text": its only tensor) -> [n, width]
    dtypes: set[str] = field(default_factory=set)

    @property
    def record(self) -> dict[str, str]:
        """The `sdtune.*` compatibility record (empty for other tools' files)."""
        return read_record(self.metadata)


def _tensors_in(data, prefix: str = ""):
    """(name, tensor) for every tensor in a loaded file, nested dicts (A1111's `string_to_param`) included."""
    if isinstance(data, torch.Tensor):
        yield prefix, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _tensors_in(value, f"{prefix}.{key}" if prefix else str(key))


def check_finite(data, path: Path) -> None:
    """Refuses a file holding NaN or infinite values: applied, such a LoRA or embedding turns every image black.

    Raises:
        FormatError: Naming the file and the first non-finite tensor.
    """
    broken = [name for name, tensor in _tensors_in(data) if tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        more = f" and {len(broken) - 1} more tensor(s)" if len(broken) > 1 else ""
        raise FormatError(
            f"{path}: tensor {broken[0]!r}{more} holds NaN or infinite values, so it would turn every image black; "
            "the training that wrote it diverged. Use an earlier save of that run (a -stepN file) or train again "
            "(a lower learning_rate, max_grad_norm: 1.0)."
        )


def load_tensors(path: Path) -> tuple[dict, dict[str, str]]:
    """(contents, header metadata) of a `.safetensors` file, or of a legacy `.pt`/`.bin`/`.ckpt` file loaded with
    `torch.load(weights_only=True)` (no code from pickles runs; such files have no header). Every tensor must be
    finite.

    Raises:
        FormatError: Unreadable, non-finite values, a pickle that needs code to load, or an unknown suffix.
    """
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".pt", ".bin", ".ckpt"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise FormatError(
                f"{path}: could not be loaded with torch.load(weights_only=True) ({type(error).__name__}); sdtune "
                "does not run code from pickled files."
            ) from error
        check_finite(data, path)
        return data, {}
    raise FormatError(f"{path}: unknown file type {path.suffix!r} (expected .safetensors or .pt).")


def _embedding_vectors(data: dict, path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout, file key -> vectors) of the embedding layouts in FORMATS.md."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        if len(params) != 1:
            raise FormatError(f"{path}: A1111 embedding with {len(params)} entries; exactly one is loadable.")
        return "a1111-pt", {"text": next(iter(params.values())).detach()}
    paired = families.from_embedding_keys(data)
    if paired:  # with the extra tensors some trainers add (OneTrainer's `clip_l_out`, `clip_g_out`)
        named = {key: value for key, value in data.items() if key.startswith(paired.embedding_keys)}
        return f"{paired.name}-pair", {key: value for key, value in named.items() if isinstance(value, torch.Tensor)}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        key, value = next(iter(tensors.items()))
        return ("emb_params" if key == "emb_params" else "single-key"), {"text": value}
    raise FormatError(f"{path}: neither a LoRA nor an embedding layout sdtune knows (keys: {list(data)[:5]}).")


def _width_family(modules: dict[str, LoraModule]) -> str | None:
    """The family a LoRA's text width names: the input width of a cross-attention key or text-encoder query."""
    for key, lora in modules.items():
        if key.endswith("attn2_to_k") or key.endswith("self_attn_q_proj"):
            signature = families.from_text_width(lora.down.flatten(1).shape[1])
            return signature.name if signature else None
    return None


def _lora_family(modules: dict[str, LoraModule], metadata: dict[str, str]) -> str | None:
    if metadata.get("sdtune.model_family"):
        return metadata["sdtune.model_family"]
    signature = families.from_kohya_metadata(metadata.get("ss_base_model_version", ""), modules)
    return signature.name if signature else _width_family(modules)


def read_artifact(path: str | Path) -> Artifact:
    """Reads a LoRA (kohya or diffusers/peft layout) or an embedding (any FORMATS.md layout).

    Raises:
        FormatError: Unreadable, or neither a LoRA nor an embedding.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    data, metadata = load_tensors(path)
    dtypes = {str(v.dtype).removeprefix("torch.") for v in data.values() if isinstance(v, torch.Tensor)}
    if is_kohya_lora(data):
        modules = parse_kohya_lora(data, path)
        return Artifact(path, "lora", "kohya", _lora_family(modules, metadata), metadata, modules, dtypes=dtypes)
    if is_lora(data):
        modules = parse_peft_lora(data, path, _peft_family(data, metadata))
        family = _lora_family(modules, metadata)
        return Artifact(path, "lora", "diffusers-peft", family, metadata, modules, dtypes=dtypes)
    layout, vectors = _embedding_vectors(data, path)
    vectors = {k: v.reshape(-1, v.shape[-1]) for k, v in vectors.items()}
    if "text" in vectors:
        signature = families.from_text_width(vectors["text"].shape[-1])
    else:
        signature = families.from_embedding_keys(vectors)
    family = metadata.get("sdtune.model_family") or (signature.name if signature else None)
    return Artifact(path, "embedding", layout, family, metadata, vectors=vectors, dtypes=dtypes)


_UNET_GROUPS = (
    ("unet attention", r"_attn[12]_"),
    ("unet feed-forward", r"_ff_net_"),
    ("unet proj_in/out", r"_proj_(in|out)$"),
    # LoCon: diffusers spelling (resnets, up/downsamplers) and LDM spelling (ResBlock layers, op, upsampler conv)
    ("unet convs (LoCon)", r"(_resnets_|samplers_|_(in|out|emb)_layers_|_skip_connection$|_op$|_\d+_conv$)"),
)
_TEXT_GROUPS = (("text encoder attention", r"_self_attn_"), ("text encoder mlp", r"_mlp_"))


def _group_of(key: str) -> str:
    if key.startswith(families.KOHYA_UNET_PREFIX):
        groups = _UNET_GROUPS
    elif key.startswith(families.kohya_text_prefixes()):
        groups = _TEXT_GROUPS
    else:
        return "other"
    return next((group for group, pattern in groups if re.search(pattern, key)), "other")


def lora_groups(modules: dict[str, LoraModule]) -> dict[str, dict]:
    """Module count, ranks and alphas per module group (unet attention, feed-forward, ..., text encoder mlp)."""
    groups: dict[str, dict] = {}
    for key, lora in sorted(modules.items()):
        entry = groups.setdefault(_group_of(key), {"modules": 0, "ranks": set(), "alphas": set()})
        entry["modules"] += 1
        entry["ranks"].add(lora.rank)
        entry["alphas"].add(lora.alpha)
    return groups


def describe(artifact: Artifact) -> str:
    """A human-readable summary: kind, layout, family, groups or vectors, metadata and record."""
    lines = [f"{artifact.path}", f"  kind: {artifact.kind} ({artifact.layout} layout), family: "
             f"{families.title(artifact.family)}"]  # fmt: skip
    lines.append(f"  dtype: {', '.join(sorted(artifact.dtypes))}")
    prediction, key = recorded_prediction_type(artifact.metadata)
    if prediction:
        lines.append(f"  made on a model predicting: {prediction} ({key})")
    for name, group in lora_groups(artifact.lora_modules).items():
        ranks = ", ".join(map(str, sorted(group["ranks"])))
        alphas = ", ".join(f"{a:g}" for a in sorted(group["alphas"]))
        lines.append(f"  {name}: {group['modules']} modules, rank {ranks}, alpha {alphas}")
    for encoder, vectors in artifact.vectors.items():
        lines.append(f"  {encoder}: {vectors.shape[0]} vector(s) of width {vectors.shape[1]}")
    shown = {k: v for k, v in artifact.metadata.items() if not k.startswith(("ss_tag_frequency", RECORD_PREFIX))}
    if shown:
        lines.append("  metadata:")
        lines += [f"    {key}: {_short(value)}" for key, value in sorted(shown.items())]
    if artifact.record:
        lines.append("  sdtune record:")
        lines += [f"    {key.removeprefix(RECORD_PREFIX)}: {value}" for key, value in sorted(artifact.record.items())]
    return "\n".join(lines)


def _short(value: str, limit: int = 100) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def summary_dict(artifact: Artifact) -> dict:
    """The summary as plain data (for `sdtune inspect --json`)."""
    groups = {
        name: {"modules": g["modules"], "ranks": sorted(g["ranks"]), "alphas": sorted(g["alphas"])}
        for name, g in lora_groups(artifact.lora_modules).items()
    }
    return {
        "path": str(artifact.path),
        "kind": artifact.kind,
        "layout": artifact.layout,
        "family": artifact.family,
        "dtypes": sorted(artifact.dtypes),
        "prediction_type": recorded_prediction_type(artifact.metadata)[0],
        "lora_groups": groups,
        "vectors": {k: list(v.shape) for k, v in artifact.vectors.items()},
        "metadata": artifact.metadata,
        "record": artifact.record,
    }


def to_json(artifact: Artifact) -> str:
    """`summary_dict` as indented JSON."""
    return json.dumps(summary_dict(artifact), indent=2, sort_keys=True)
