"""Writers for trained artifacts in the layouts WebUI, ComfyUI and diffusers load (see shared/FORMATS.md).

Every write is atomic: the file is written under a temporary name in the same folder, then renamed.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

MODELSPEC_ARCHITECTURES = {"sd1": "stable-diffusion-v1"}
EMBEDDING_KEY = "emb_params"


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Saves tensors to `path` through a temporary file and a rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(temporary), metadata=metadata)
        os.chmod(temporary, 0o666 & ~_current_umask())  # safetensors creates files readable by the owner only
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def modelspec_metadata(family: str, adapter: str, title: str, resolution: int, prediction_type: str) -> dict[str, str]:
    """Stability ModelSpec 1.0.1 keys for an adapter (`lora` or `textual-inversion`) of the given family."""
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{MODELSPEC_ARCHITECTURES[family]}/{adapter}",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }


def save_embedding(path: Path, vectors: torch.Tensor, metadata: dict[str, str]) -> Path:
    """Writes a textual-inversion embedding as `{"emb_params": float32[n, width]}` (kohya's SD1/SD2 layout).

    A1111 and ComfyUI read the single tensor; diffusers reads it with `load_textual_inversion(path, token=...)`.

    Args:
        path: Target `.safetensors` file.
        vectors: The `[n, width]` embedding.
        metadata: Header entries (strings only).

    Returns:
        The path written.
    """
    if vectors.ndim != 2:
        raise ValueError(f"an embedding must be [vectors, width], got shape {tuple(vectors.shape)}.")
    return atomic_save_safetensors({EMBEDDING_KEY: vectors.detach().float().cpu()}, path, metadata)
