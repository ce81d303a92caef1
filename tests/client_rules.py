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
