"""What an artifact records about the base model it fits (the `sdtune.*` header keys).

The record is written into every file sdtune exports, so a later load can check family, text width and tokenizer
before the artifact touches a pipeline.
"""

from __future__ import annotations

from sdtune import __version__
from sdtune.models import BaseModel, base_model_sha256, tokenizer_fingerprint

RECORD_PREFIX = "sdtune."


def base_record(base: BaseModel) -> dict[str, str]:
    """The `sdtune.*` keys that describe a base model. Call it before placeholder tokens are added.

    Args:
        base: The loaded base model.

    Returns:
        String-valued header entries: family, text-encoder width, tokenizer fingerprint, base name and sha256,
        prediction type and sdtune version.
    """
    return {
        "sdtune.version": __version__,
        "sdtune.model_family": base.family,
        "sdtune.text_encoder_width": str(base.text_width),
        "sdtune.tokenizer_fingerprint": tokenizer_fingerprint(base.tokenizer),
        "sdtune.base_model_name": base.name,
        "sdtune.base_model_sha256": base_model_sha256(base.source),
        "sdtune.prediction_type": base.prediction_type,
    }


def read_record(metadata: dict[str, str] | None) -> dict[str, str]:
    """The `sdtune.*` entries of a safetensors header (empty for files made by other tools)."""
    return {key: value for key, value in (metadata or {}).items() if key.startswith(RECORD_PREFIX)}
