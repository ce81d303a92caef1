"""Reading trained artifacts (LoRAs and embeddings, ours and other tools'): what a file is and what it fits.

Used by `sdtune inspect` and by inference; it never imports training code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtune import compat, formats

FAMILY_BY_KOHYA_VERSION = {"sd_v1": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2"}
FAMILY_BY_TEXT_WIDTH = {768: "sd1", 1024: "sd2"}


@dataclass
class Artifact:
    """What a LoRA or embedding file holds, as far as its keys, shapes and header tell."""

    path: Path
    kind: str  # "lora" or "embedding"
    layout: str  # kohya, diffusers-peft, emb_params, a1111-pt, sdxl-pair, single-key
    family: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    lora_modules: dict[str, formats.LoraModule] = field(default_factory=dict)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)  # encoder key -> [n, width]
    dtypes: set[str] = field(default_factory=set)

    @property
    def record(self) -> dict[str, str]:
        """The `sdtune.*` compatibility record (empty for other tools' files)."""
        return compat.read_record(self.metadata)


def load_tensors(path: Path) -> tuple[dict, dict[str, str]]:
    """(contents, header metadata) of a `.safetensors` file, or of a legacy `.pt`/`.bin`/`.ckpt` file loaded with
    `torch.load(weights_only=True)` (no code from pickles runs; such files have no header).

    Raises:
        FormatError: Unreadable, a pickle that needs code to load, or an unknown suffix.
    """
    if path.suffix == ".safetensors":
        return formats.read_safetensors(path)
    if path.suffix in (".pt", ".bin", ".ckpt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), {}
        except Exception as error:
            raise formats.FormatError(
                f"{path}: could not be loaded with torch.load(weights_only=True) ({type(error).__name__}); sdtune "
                "does not run code from pickled files."
            ) from error
    raise formats.FormatError(f"{path}: unknown file type {path.suffix!r} (expected .safetensors or .pt).")


def _embedding_vectors(data: dict, path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout, encoder key -> vectors) of the embedding layouts in FORMATS.md."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        if len(params) != 1:
            raise formats.FormatError(f"{path}: A1111 embedding with {len(params)} entries; exactly one is loadable.")
        return "a1111-pt", {"text": next(iter(params.values())).detach()}
    if "clip_l" in data and "clip_g" in data:
        return "sdxl-pair", {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        key, value = next(iter(tensors.items()))
        return ("emb_params" if key == "emb_params" else "single-key"), {"text": value}
    raise formats.FormatError(f"{path}: neither a LoRA nor an embedding layout sdtune knows (keys: {list(data)[:5]}).")


def _lora_family(modules: dict[str, formats.LoraModule], metadata: dict[str, str]) -> str | None:
    if metadata.get("sdtune.model_family"):
        return metadata["sdtune.model_family"]
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl_") or any(k.startswith(("lora_te1_", "lora_te2_")) for k in modules):
        return "sdxl"
    if version in FAMILY_BY_KOHYA_VERSION:
        return FAMILY_BY_KOHYA_VERSION[version]
    for key, lora in modules.items():
        if key.endswith("attn2_to_k") or key.endswith("self_attn_q_proj"):
            return FAMILY_BY_TEXT_WIDTH.get(lora.down.flatten(1).shape[1])
    return None


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
    if formats.is_kohya_lora(data):
        modules = formats.parse_kohya_lora(data, path)
        return Artifact(path, "lora", "kohya", _lora_family(modules, metadata), metadata, modules, dtypes=dtypes)
    if any(".lora_A." in key for key in data):
        modules = formats.parse_peft_lora(data, path)
        family = _lora_family(modules, metadata)
        return Artifact(path, "lora", "diffusers-peft", family, metadata, modules, dtypes=dtypes)
    layout, vectors = _embedding_vectors(data, path)
    vectors = {k: v.reshape(-1, v.shape[-1]) for k, v in vectors.items()}
    family = metadata.get("sdtune.model_family") or (
        "sdxl" if layout == "sdxl-pair" else FAMILY_BY_TEXT_WIDTH.get(vectors["text"].shape[-1])
    )
    return Artifact(path, "embedding", layout, family, metadata, vectors=vectors, dtypes=dtypes)


_GROUPS = (
    ("unet attention", r"^lora_unet_.*_attn[12]_"),
    ("unet feed-forward", r"^lora_unet_.*_ff_net_"),
    ("unet proj_in/out", r"^lora_unet_.*_proj_(in|out)$"),
    ("unet convs (LoCon)", r"^lora_unet_.*(_resnets_|samplers_)"),
    ("text encoder attention", r"^lora_te\d?_.*_self_attn_"),
    ("text encoder mlp", r"^lora_te\d?_.*_mlp_"),
)


def lora_groups(modules: dict[str, formats.LoraModule]) -> dict[str, dict]:
    """Module count, ranks and alphas per module group (unet attention, feed-forward, ..., text encoder mlp)."""
    groups: dict[str, dict] = {}
    for key, lora in sorted(modules.items()):
        name = next((group for group, pattern in _GROUPS if re.search(pattern, key)), "other")
        entry = groups.setdefault(name, {"modules": 0, "ranks": set(), "alphas": set()})
        entry["modules"] += 1
        entry["ranks"].add(lora.rank)
        entry["alphas"].add(lora.alpha)
    return groups


def describe(artifact: Artifact) -> str:
    """A human-readable summary: kind, layout, family, groups or vectors, metadata and record."""
    from sdtune.models import FAMILY_NAMES

    family = FAMILY_NAMES.get(artifact.family, artifact.family or "unknown")
    lines = [f"{artifact.path}", f"  kind: {artifact.kind} ({artifact.layout} layout), family: {family}"]
    lines.append(f"  dtype: {', '.join(sorted(artifact.dtypes))}")
    for name, group in lora_groups(artifact.lora_modules).items():
        ranks = ", ".join(map(str, sorted(group["ranks"])))
        alphas = ", ".join(f"{a:g}" for a in sorted(group["alphas"]))
        lines.append(f"  {name}: {group['modules']} modules, rank {ranks}, alpha {alphas}")
    for encoder, vectors in artifact.vectors.items():
        lines.append(f"  {encoder}: {vectors.shape[0]} vector(s) of width {vectors.shape[1]}")
    shown = {k: v for k, v in artifact.metadata.items() if not k.startswith(("ss_tag_frequency", "sdtune."))}
    if shown:
        lines.append("  metadata:")
        lines += [f"    {key}: {_short(value)}" for key, value in sorted(shown.items())]
    if artifact.record:
        lines.append("  sdtune record:")
        lines += [f"    {key.removeprefix('sdtune.')}: {value}" for key, value in sorted(artifact.record.items())]
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
        "lora_groups": groups,
        "vectors": {k: list(v.shape) for k, v in artifact.vectors.items()},
        "metadata": artifact.metadata,
        "record": artifact.record,
    }


def to_json(artifact: Artifact) -> str:
    """`summary_dict` as indented JSON."""
    return json.dumps(summary_dict(artifact), indent=2, sort_keys=True)
