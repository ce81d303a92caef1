"""Image folder -> `metadata.csv` (`file_name,text`) through a small `Captioner` protocol.

Backends: `template` (no model: `"a photo of {trigger}"`), `openclip` (zero-shot tags: cosine similarity between the
image and `"a photo of {tag}"` for every tag of a vocabulary, top-k above a threshold) and `blip` (a BLIP captioner
through transformers, from a local folder or a hub name when online). Existing captions are kept unless asked to
overwrite; the CSV is written atomically and read back by `sdtune train` as is.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from tqdm import tqdm

from sdtune import data
from sdtune.config import IMAGE_SUFFIXES
from sdtune.errors import SdtuneError

# A small general vocabulary for the open_clip tagger; pass your own with `--tags FILE` (one tag per line).
DEFAULT_TAGS = (
    "person", "man", "woman", "child", "face", "portrait", "full body", "smiling", "hat", "glasses", "dress", "suit",
    "dog", "cat", "bird", "horse", "animal", "flower", "tree", "grass", "forest", "mountain", "sky", "clouds",
    "sunset", "beach", "sea", "river", "snow", "city", "street", "building", "house", "room", "table", "chair",
    "car", "bicycle", "boat", "food", "fruit", "cup", "book", "toy", "robot", "statue", "painting", "drawing",
    "sketch", "anime", "cartoon", "3d render", "photo", "black and white", "night", "indoors", "outdoors",
    "close-up", "red", "blue", "green", "yellow", "white", "black",
)  # fmt: skip


class Captioner(Protocol):
    """Turns images into caption text (one per image, in order)."""

    def caption(self, images: list[Image.Image]) -> list[str]: ...


@dataclass
class TemplateCaptioner:
    """The same caption for every image, e.g. `"a photo of {trigger}"` (needs no model)."""

    template: str = "a photo of {trigger}"
    trigger: str = ""

    def caption(self, images: list[Image.Image]) -> list[str]:
        """`template` with `{trigger}` filled, once per image."""
        return [self.template.format(trigger=self.trigger).strip()] * len(images)


@dataclass
class OpenClipTagger:
    """Zero-shot tags from an open_clip model: each tag's score is the cosine similarity between the image embedding
    and the text embedding of `"a photo of {tag}"`; the `top_k` best scores at or above `threshold` become tags."""

    model_name: str
    pretrained: str | None  # a local checkpoint file, or an open_clip pretrained tag when online
    tags: tuple[str, ...] = DEFAULT_TAGS
    top_k: int = 5
    threshold: float = -1.0
    device: str = "cpu"
    _model: object = field(default=None, repr=False)

    def _load(self):
        if self._model is None:
            import open_clip

            model, _, preprocess = open_clip.create_model_and_transforms(self.model_name, pretrained=self.pretrained)
            model.eval().to(self.device)
            tokens = open_clip.get_tokenizer(self.model_name)([f"a photo of {tag}" for tag in self.tags])
            with torch.no_grad():
                text = model.encode_text(tokens.to(self.device)).float()
            self._model = (model, preprocess, text / text.norm(dim=-1, keepdim=True))
        return self._model

    def scores(self, images: list[Image.Image]) -> torch.Tensor:
        """[images, tags] cosine similarities."""
        model, preprocess, text = self._load()
        pixels = torch.stack([preprocess(image.convert("RGB")) for image in images]).to(self.device)
        with torch.no_grad():
            embedded = model.encode_image(pixels).float()
        return (embedded / embedded.norm(dim=-1, keepdim=True)) @ text.T

    def caption(self, images: list[Image.Image]) -> list[str]:
        """The best tags per image, best first, joined with `, ` (ties broken by vocabulary order)."""
        captions = []
        for row in self.scores(images):
            order = sorted(range(len(self.tags)), key=lambda i: (-float(row[i]), i))[: self.top_k]
            captions.append(", ".join(self.tags[i] for i in order if float(row[i]) >= self.threshold))
        return captions


@dataclass
class BlipCaptioner:
    """Sentence captions from a BLIP model through transformers (`BlipForConditionalGeneration`), greedy decoding."""

    model_path: str
    max_new_tokens: int = 30
    device: str = "cpu"
    _model: object = field(default=None, repr=False)

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One greedy-decoded caption per image."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if self._model is None:
            processor = BlipProcessor.from_pretrained(self.model_path)
            model = BlipForConditionalGeneration.from_pretrained(self.model_path).eval().to(self.device)
            self._model = (processor, model)
        processor, model = self._model
        inputs = processor(images=[image.convert("RGB") for image in images], return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


class LabelError(SdtuneError, ValueError):
    """A folder or metadata.csv that cannot be labeled."""


@dataclass
class LabelResult:
    """What `label_folder` did."""

    path: Path  # the metadata.csv written
    written: int  # captions produced now
    kept: int  # existing captions left as they were
    tag_frequency: dict[str, int]  # over every caption in the file, as kohya counts tags


def _read_rows(path: Path, caption_column: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(columns, file name -> row) of an existing metadata.csv; a new file gets `file_name,<caption_column>`."""
    if not path.is_file():
        return ["file_name", caption_column], {}
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")))
        rows = {row["file_name"]: row for row in reader} if "file_name" in (reader.fieldnames or []) else None
    except UnicodeDecodeError as error:
        raise LabelError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8 or move it away.") from error
    if rows is None:
        raise LabelError(f"{path}: has no file_name column; fix the header or move the file away.")
    columns = list(reader.fieldnames) + ([caption_column] if caption_column not in reader.fieldnames else [])
    return columns, rows


def compose_caption(body: str, trigger: str | None, prefix: str | None, suffix: str | None) -> str:
    """`prefix, trigger, body, suffix` (the trigger only when the body does not already contain it)."""
    trigger = trigger if trigger and trigger not in body else None
    return ", ".join(part for part in (prefix, trigger, body, suffix) if part)


def label_folder(
    folder: Path,
    captioner: Captioner,
    trigger: str | None = None,
    prefix: str | None = None,
    suffix: str | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    caption_column: str = "text",
    progress: bool = True,
) -> LabelResult:
    """Writes or updates `folder/metadata.csv`: a caption for every image that has none (all with `overwrite`),
    other rows and columns kept. Images are read as training reads them (EXIF rotation, alpha over white).

    Raises:
        LabelError: No images, or an existing metadata.csv that cannot be read.
    """
    folder = Path(folder)
    images = data.list_images(folder) if folder.is_dir() else []
    if not images:
        raise LabelError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) to label.")
    path = folder / "metadata.csv"
    columns, rows = _read_rows(path, caption_column)
    todo = [p for p in images if overwrite or not (rows.get(p.name) or {}).get(caption_column, "").strip()]
    for start in tqdm(range(0, len(todo), batch_size), desc="labeling", unit="batch", disable=not progress):
        batch = todo[start : start + batch_size]
        for image, body in zip(batch, captioner.caption([data.load_rgb(p) for p in batch]), strict=True):
            rows.setdefault(image.name, {"file_name": image.name})[caption_column] = compose_caption(
                body, trigger, prefix, suffix
            )
    data.write_metadata(folder, [rows[name] for name in sorted(rows)], tuple(columns))
    captions = [data.Example(folder / name, row.get(caption_column, "")) for name, row in rows.items()]
    return LabelResult(path, len(todo), len(images) - len(todo), data.tag_frequency(captions))
