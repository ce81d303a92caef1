"""What an artifact records about the base model it fits (the `sdtune.*` header keys), and the gates that check an
artifact against a base model before it touches a pipeline.

The record is written into every file sdtune exports. Files made by other tools carry none; they are checked by
their keys and shapes alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdtune import __version__, formats
from sdtune.models import FAMILY_NAMES, BaseModel, base_model_sha256, tokenizer_fingerprint

RECORD_PREFIX = "sdtune."


class IncompatibleArtifactError(Exception):
    """An artifact that does not fit the base model. Raised before the artifact touched the pipeline."""


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


@dataclass
class FitReport:
    """Why an artifact does not fit a base model, in two kinds.

    `blocking`: it cannot work on this base (family, widths, keys or shapes). `other_base`: it fits the shapes but
    was made on another checkpoint or tokenizer of the same family, which works often enough that `force` lets it
    load with a warning.
    """

    blocking: list[str] = field(default_factory=list)
    other_base: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """True when nothing at all stands in the way."""
        return not self.blocking and not self.other_base


def check_fit(artifact, base: BaseModel, base_tokenizer_fingerprint: str | None = None) -> FitReport:
    """Checks a read artifact (`sdtune.artifacts.Artifact`) against a loaded base model.

    Checks the family, every LoRA key and shape against the base's modules, embedding widths, and the `sdtune.*`
    record: text width (blocking), base checkpoint sha256 and tokenizer fingerprint (other base). Pass
    `base_tokenizer_fingerprint` when embeddings may already have added tokens to the base's tokenizer.
    """
    report = FitReport()
    if artifact.family and artifact.family != base.family:
        made_for = FAMILY_NAMES.get(artifact.family, artifact.family)
        report.blocking.append(f"made for {made_for}, the base is {FAMILY_NAMES[base.family]}")
    if artifact.kind == "lora" and artifact.lora_modules:
        key_map = formats.module_key_map(base.unet, base.text_encoder)
        report.blocking += formats.lora_fit_problems(artifact.lora_modules, key_map)
    if artifact.kind == "embedding" and "text" in artifact.vectors:
        width = artifact.vectors["text"].shape[-1]
        if width != base.text_width:
            report.blocking.append(f"embedding width {width}, the base's text encoder takes {base.text_width}")
    record = artifact.record
    if record.get("sdtune.text_encoder_width") and int(record["sdtune.text_encoder_width"]) != base.text_width:
        report.blocking.append(f"recorded text width {record['sdtune.text_encoder_width']}, base {base.text_width}")
    if report.blocking:
        return report
    recorded_sha = record.get("sdtune.base_model_sha256")
    if recorded_sha and recorded_sha != base_model_sha256(base.source):
        report.other_base.append(
            f"trained on {record.get('sdtune.base_model_name', '?')} (sha256 {recorded_sha[:10]}), "
            f"this base is {base.name} (sha256 {base_model_sha256(base.source)[:10]})"
        )
    fingerprint = record.get("sdtune.tokenizer_fingerprint")
    if fingerprint and fingerprint != (base_tokenizer_fingerprint or tokenizer_fingerprint(base.tokenizer)):
        report.other_base.append("trained with a different tokenizer than the base's (tokenizer fingerprint differs)")
    return report


def require_fit(
    artifact, base: BaseModel, force: bool = False, base_tokenizer_fingerprint: str | None = None
) -> list[str]:
    """The gate: raises unless the artifact fits; returns the warnings that `force` turned from errors.

    Args:
        artifact: A read artifact (`sdtune.artifacts.read_artifact`).
        base: The base model it is about to be loaded into.
        force: Accept an artifact made on another checkpoint (or tokenizer) of the same family.
        base_tokenizer_fingerprint: The base tokenizer's fingerprint from before any embedding was added.

    Raises:
        IncompatibleArtifactError: What does not match, and the ways out.
    """
    report = check_fit(artifact, base, base_tokenizer_fingerprint)
    if report.blocking or (report.other_base and not force):
        raise IncompatibleArtifactError(incompatibility_message(artifact, base, report))
    return report.other_base


def incompatibility_message(artifact, base: BaseModel, report: FitReport) -> str:
    """What does not match and the ways out, for people."""
    lines = [f"{artifact.path} does not fit the base model {base.name} ({base.source}):"]
    lines += [f"  - {problem}" for problem in report.blocking + report.other_base]
    made_on = artifact.record.get("sdtune.base_model_name")
    ways = [f"load the base model it was made for{f' ({made_on})' if made_on else ''}", "re-train it on this base"]
    if not report.blocking:
        ways.append(
            "or, for a file moved between checkpoints of the same family (often fine), load it with force "
            "(`--force`, `force=True`): it then loads with a warning"
        )
    lines.append("Ways out: " + "; ".join(ways) + ". The pipeline was left unchanged.")
    return "\n".join(lines)
