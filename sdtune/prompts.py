"""Prompt syntax people already use, resolved against folders of LoRAs and embeddings (see shared/FORMATS.md).

- A1111: `<lora:NAME:WEIGHT>`, `<lora:NAME:TE_WEIGHT:UNET_WEIGHT>` (also `te=`/`unet=`), NAME = file stem or the
  file's `ss_output_name`; an embedding is used by writing its file stem.
- ComfyUI: `embedding:NAME`.
The tags are removed from the text the text encoder sees. Unknown names are errors, never skipped.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from sdtune.errors import SdtuneError
from sdtune.formats import FormatError, is_lora

LORA_TAG = re.compile(r"<lora:([^<>]*)>")
COMFY_EMBEDDING = re.compile(r"embedding:([^\s,()<>:]+)")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
STATE_MARKER = "state.json"  # what every sdtune training state folder holds (`state.py`); nothing in it is a LoRA


class PromptError(SdtuneError, ValueError):
    """A prompt tag that cannot be resolved or parsed."""


@dataclass
class ParsedPrompt:
    """A prompt with its adapter tags taken out."""

    text: str  # what the text encoder sees
    loras: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (text-encoder, UNet) weight
    embeddings: list[str] = field(default_factory=list)  # embedding names the text uses


def lora_weights(name: str, fields: list[str], tag: str) -> tuple[float, float]:
    """(text-encoder, UNet) weights from a tag's fields: `[]` -> 1, `["0.8"]` -> both, `["1", "0.5"]`, `["te=1"]`."""
    positional, named = [], {}
    for part in fields:
        key, equals, value = part.partition("=")
        try:
            if equals:
                named[key.strip()] = float(value)
            else:
                positional.append(float(part))
        except ValueError:
            raise PromptError(
                f"{tag}: {part!r} is not a number; write <lora:{name}:0.8> or <lora:{name}:1:0.5>"
            ) from None
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 2:
        raise PromptError(f"{tag}: sdtune reads a weight, or text-encoder and UNet weights (te=, unet=); not {fields}")
    if not all(math.isfinite(value) for value in [*positional, *named.values()]):
        raise PromptError(f"{tag}: a weight must be a finite number, not {fields}; write <lora:{name}:0.8>")
    text_encoder = unet = positional[0] if positional else 1.0
    if len(positional) == 2:
        unet = positional[1]
    return named.get("te", text_encoder), named.get("unet", unet)


def parse_prompt(prompt: str, embedding_names=()) -> ParsedPrompt:
    """Takes `<lora:...>` tags out of a prompt and finds the embeddings it uses.

    Args:
        prompt: The prompt as the user wrote it.
        embedding_names: Names (file stems) of the embeddings that may appear as words.

    Raises:
        PromptError: A malformed tag, or a LoRA named twice.
    """
    loras: dict[str, tuple[float, float]] = {}
    for match in LORA_TAG.finditer(prompt):
        name, *fields = match.group(1).split(":")
        name = name.strip()
        if not name:
            raise PromptError(f"{match.group(0)}: the LoRA name is empty")
        if name in loras:
            raise PromptError(f"{prompt!r} names <lora:{name}> twice; keep one tag per LoRA")
        loras[name] = lora_weights(name, fields, match.group(0))
    text = LORA_TAG.sub(" ", prompt)
    embeddings = [m.group(1) for m in COMFY_EMBEDDING.finditer(text)]
    text = COMFY_EMBEDDING.sub(lambda m: m.group(1), text)
    for name in embedding_names:
        if name not in embeddings and re.search(rf"(?<![\w<>-]){re.escape(name)}(?![\w<>-])", text):
            embeddings.append(name)
    text = re.sub(r"\s+", " ", re.sub(r"\s+,", ",", text)).strip(" ,")
    return ParsedPrompt(text, loras, embeddings)


def _lora_names(path: Path) -> list[str]:
    """The names a LoRA file answers to: its stem and its `ss_output_name` (A1111's alias); none when its keys are
    no LoRA layout (kohya, diffusers/peft; the rule of `formats.read_artifact`): an embedding, a checkpoint, a
    training state's weights. Only the header is read.

    Raises:
        FormatError: The file cannot be read as safetensors.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys, alias = list(handle.keys()), (handle.metadata() or {}).get("ss_output_name")
    except Exception as error:
        raise FormatError(f"{path}: not a readable .safetensors file ({error}).") from error
    if not is_lora(keys):
        return []
    return [path.stem] + ([alias] if alias and alias != path.stem else [])


class AdapterLibrary:
    """The LoRA and embedding files in some folders (searched recursively), by the names prompts use.

    Not listed: hidden files and folders (names starting with "."; unfinished writes), training state folders
    (those holding `state.json`: their `trainable.safetensors` holds training weights, not a LoRA or embedding),
    `.safetensors` files whose keys are no LoRA layout in a LoRA folder (kept in `not_loras` for the error that
    names them) and LoRA files in an embedding folder.
    """

    def __init__(self, lora_dirs=(), embedding_dirs=()):
        self.loras: dict[str, list[Path]] = {}
        self.embeddings: dict[str, list[Path]] = {}
        self.not_loras: dict[str, list[Path]] = {}
        for folder in map(Path, lora_dirs):
            for path in _files(folder, (".safetensors",), "LoRA"):
                names = _lora_names(path)
                for name in names:
                    self.loras.setdefault(name, []).append(path)
                if not names:
                    self.not_loras.setdefault(path.stem, []).append(path)
        for folder in map(Path, embedding_dirs):
            for path in _files(folder, EMBEDDING_SUFFIXES, "embedding"):
                if path.suffix != ".safetensors" or not _lora_names(path):
                    self.embeddings.setdefault(path.stem, []).append(path)

    def lora(self, name: str) -> Path:
        """The LoRA file called `name` (stem or `ss_output_name`)."""
        if name not in self.loras and name in self.not_loras:
            listed = ", ".join(map(str, self.not_loras[name]))
            raise PromptError(
                f"the prompt names LoRA {name!r}, but {listed} holds no LoRA (its keys are no kohya or diffusers "
                "LoRA layout: an embedding, a checkpoint or training weights?). Name a LoRA file, or export one."
            )
        return _one(name, self.loras, "LoRA", "<lora:NAME:WEIGHT>")

    def embedding(self, name: str) -> Path:
        """The embedding file whose stem is `name`."""
        return _one(name, self.embeddings, "embedding", "its file stem or embedding:NAME")


def _files(folder: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """The files under `folder` with one of `suffixes`, sorted, leaving out hidden ones and training states."""
    if not folder.is_dir():
        raise FormatError(f"{what} folder {folder} does not exist (or is not a folder).")
    found = []
    for root, folders, names in os.walk(folder):
        if STATE_MARKER in names:
            folders[:] = []
            continue
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(root, n) for n in names if not n.startswith(".") and Path(n).suffix in suffixes]
    return sorted(found)


def _one(name: str, index: dict[str, list[Path]], what: str, syntax: str) -> Path:
    paths = index.get(name)
    if not paths:
        close = difflib.get_close_matches(name, list(index), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(index)[:10]) or f"none: give a folder of {what}s"
        raise PromptError(
            f"the prompt names {what} {name!r} ({syntax}), but no such file is known.{hint} Known: {known}."
        )
    if len(set(paths)) > 1:
        listed = ", ".join(map(str, sorted(set(paths))))
        raise PromptError(f"{what} name {name!r} is ambiguous: {listed}. Rename one of the files.")
    return paths[0]
