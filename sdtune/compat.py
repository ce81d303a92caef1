"""What an artifact records about the base model it fits (the `sdtune.*` header keys), and the gates that check an
artifact against a base model before it touches a pipeline.

The record is written into every file sdtune exports. Files made by other tools carry none; they are checked by
their keys and shapes alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdtune import families, formats
from sdtune._version import __version__
from sdtune.errors import SdtuneError
from sdtune.families import Family, TextEncoder
from sdtune.models import BaseModel, base_model_sha256, tokenizer_fingerprint


class IncompatibleArtifactError(SdtuneError):
    """An artifact that does not fit the base model. Raised before the artifact touched the pipeline."""


def _widths(widths) -> str:
    return ",".join(str(width) for width in widths)


def base_record(base: BaseModel) -> dict[str, str]:
    """The `sdtune.*` keys that describe a base model. Call it before placeholder tokens are added.

    Args:
        base: The loaded base model.

    Returns:
        String-valued header entries: family, text-encoder width(s), tokenizer fingerprint, base name and sha256,
        prediction type and sdtune version.
    """
    return {
        "sdtune.version": __version__,
        "sdtune.model_family": base.family.name,
        "sdtune.text_encoder_width": _widths(base.text_widths),
        "sdtune.tokenizer_fingerprint": tokenizer_fingerprint(*base.tokenizers.values()),
        "sdtune.base_model_name": base.name,
        "sdtune.base_model_sha256": base_model_sha256(base.source),
        "sdtune.prediction_type": base.prediction_type,
    }


def embedding_targets(artifact: formats.Artifact, family: Family) -> list[tuple[TextEncoder, torch.Tensor]]:
    """Which text encoder of the family each of an embedding's tensors goes to: a one-tensor file to a one-encoder
    family's encoder, a several-tensor file (SDXL's `clip_l` + `clip_g`) by the encoders' embedding keys."""
    if set(artifact.vectors) == {"text"}:
        return [(family.text_encoders[0], artifact.vectors["text"])] if len(family.text_encoders) == 1 else []
    return [
        (spec, artifact.vectors[spec.embedding_key])
        for spec in family.text_encoders
        if spec.embedding_key in artifact.vectors
    ]


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


def _blocking_problems(artifact: formats.Artifact, base: BaseModel) -> list[str]:
    """Family, LoRA keys and shapes, embedding widths, and the recorded text widths."""
    problems = []
    if artifact.family and artifact.family != base.family.name:
        problems.append(f"made for {families.title(artifact.family)}, the base is {base.family.title}")
    if artifact.kind == "lora" and artifact.lora_modules:
        key_map = formats.module_key_map(base.family, base.adaptable(), other_spelling=True)
        problems += formats.lora_fit_problems(artifact.lora_modules, key_map)
    if artifact.kind == "embedding":
        targets = embedding_targets(artifact, base.family)
        if not targets and not problems:
            problems.append(f"holds {', '.join(artifact.vectors)}, which no text encoder of {base.family.title} takes")
        elif targets and len(targets) < len(base.family.text_encoders):
            wanted = ", ".join(spec.embedding_key for spec in base.family.text_encoders)
            problems.append(f"holds vectors for {len(targets)} text encoder(s); {base.family.title} needs {wanted}")
        for spec, vectors in targets:
            width = base.text_encoders[spec.component].get_input_embeddings().weight.shape[1]
            if vectors.shape[-1] != width:
                problems.append(f"embedding width {vectors.shape[-1]}, the base's text encoder takes {width}")
    recorded = artifact.record.get("sdtune.text_encoder_width")
    if recorded and recorded != _widths(base.text_widths):
        problems.append(f"recorded text width {recorded}, base {_widths(base.text_widths)}")
    return problems


def check_fit(artifact: formats.Artifact, base: BaseModel, base_tokenizer_fingerprint: str | None = None) -> FitReport:
    """Checks a read artifact (`formats.read_artifact`) against a loaded base model.

    Checks the family, every LoRA key and shape against the base's modules, embedding widths, and the `sdtune.*`
    record: text widths (blocking), base checkpoint sha256, prediction type (also from other tools' headers) and
    tokenizer fingerprint (other base). Pass
    `base_tokenizer_fingerprint` when embeddings may already have added tokens to the base's tokenizers.
    """
    report = FitReport(blocking=_blocking_problems(artifact, base))
    if report.blocking:
        return report
    record = artifact.record
    recorded_sha = record.get("sdtune.base_model_sha256")
    if recorded_sha and recorded_sha != base_model_sha256(base.source):
        report.other_base.append(
            f"trained on {record.get('sdtune.base_model_name', '?')} (sha256 {recorded_sha[:10]}), "
            f"this base is {base.name} (sha256 {base_model_sha256(base.source)[:10]})"
        )
    prediction, key = formats.recorded_prediction_type(artifact.metadata)
    if prediction and prediction != base.prediction_type:
        report.other_base.append(
            f"made on a model predicting {prediction} ({key}), this base predicts {base.prediction_type} "
            "(SD2.x: a 768-v file on a 512-base model or the reverse)"
        )
    fingerprint = record.get("sdtune.tokenizer_fingerprint")
    current = base_tokenizer_fingerprint or tokenizer_fingerprint(*base.tokenizers.values())
    if fingerprint and fingerprint != current:
        report.other_base.append("trained with a different tokenizer than the base's (tokenizer fingerprint differs)")
    return report


def require_fit(
    artifact: formats.Artifact, base: BaseModel, force: bool = False, base_tokenizer_fingerprint: str | None = None
) -> list[str]:
    """The gate: raises unless the artifact fits; returns the warnings that `force` turned from errors.

    Args:
        artifact: A read artifact (`formats.read_artifact`).
        base: The base model it is about to be loaded into.
        force: Accept an artifact made on another checkpoint (or tokenizer) of the same family.
        base_tokenizer_fingerprint: The base tokenizers' fingerprint from before any embedding was added.

    Raises:
        IncompatibleArtifactError: What does not match, and the ways out.
    """
    report = check_fit(artifact, base, base_tokenizer_fingerprint)
    if report.blocking or (report.other_base and not force):
        raise IncompatibleArtifactError(incompatibility_message(artifact, base, report))
    return report.other_base


def incompatibility_message(artifact: formats.Artifact, base: BaseModel, report: FitReport) -> str:
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
