"""Training data: image folders with `metadata.csv` captions (the diffusers / HF imagefolder convention).

`scan_dataset` checks everything it can without loading a model (files exist and decode, the CSV has the right
columns, captions name the placeholder) and returns the examples; `ImageCaptionDataset` turns them into tensors.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from sdtune.config import IMAGE_SUFFIXES, TrainConfig

# Prompt templates used when a TI dataset has no captions (the Textual Inversion paper's setup, Gal et al. 2022).
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of a {}",
    "a photo of one {}",
    "a photo of the small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a close-up painting in the style of {}",
    "a good painting in the style of {}",
    "a small painting in the style of {}",
)
_MAX_LISTED = 5


@dataclass(frozen=True)
class Example:
    """One training image and its caption (None: the caption comes from the TI templates)."""

    image_path: Path
    caption: str | None


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_metadata(path: Path, caption_column: str) -> tuple[dict[str, str], list[str]]:
    """Reads a `file_name,<caption_column>` CSV. Returns (file name -> caption, problems found)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        return {}, [f"metadata_path: {path} is not UTF-8 text (byte {error.start}); save it as UTF-8."]
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    missing = [name for name in ("file_name", caption_column) if name not in columns]
    if missing:
        return {}, [
            f"metadata_path: {path} has no {' or '.join(repr(m) for m in missing)} column (columns: "
            f"{', '.join(columns) or 'none'}); the first line must name them, e.g. file_name,{caption_column}."
        ]
    captions, errors = {}, []
    for line_number, row in enumerate(reader, start=2):
        name = (row.get("file_name") or "").strip()
        if name in captions:
            errors.append(f"metadata_path: {path} line {line_number}: {name!r} is listed twice; keep one row.")
        captions[name] = (row.get(caption_column) or "").strip()
    return captions, errors


def _check_image(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for damaged or non-image files
        return f"{path}: not a readable image ({type(error).__name__}: {error})."
    return None


def scan_dataset(config: TrainConfig, placeholder: str | None) -> tuple[list[Example], list[str]]:
    """Finds the training examples and every problem with them, before any model is loaded.

    Args:
        config: The training config (data folder, metadata CSV, caption column).
        placeholder: The TI placeholder every caption must name, or None.

    Returns:
        (examples, problems). Training must not start while problems is non-empty.
    """
    folder = Path(config.train_data_dir)
    images = list_images(folder)
    if not images:
        return [], [f"train_data_dir: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})."]
    errors = [e for e in map(_check_image, images) if e]
    metadata_path = config.effective_metadata_path
    if metadata_path is None:
        return [Example(p, None) for p in images], errors
    captions, csv_errors = read_metadata(metadata_path, config.caption_column)
    errors += csv_errors
    if not captions:  # unreadable CSV or missing columns: nothing more to compare
        return [], errors or [f"metadata_path: {metadata_path} has no rows."]
    names = {p.name for p in images}
    missing = sorted(name for name in captions if name not in names)
    if missing:
        errors.append(f"metadata_path: {metadata_path} names files not in {folder}: {_listing(missing)}.")
    uncaptioned = sorted(name for name in names if name not in captions)
    if uncaptioned:
        errors.append(
            f"metadata_path: {metadata_path} has no row for {_listing(uncaptioned)}; add rows or move the images out."
        )
    if placeholder:
        lacking = sorted(name for name, text in captions.items() if placeholder not in text)
        if lacking:
            errors.append(
                f"metadata_path: the captions of {_listing(lacking)} lack placeholder_token {placeholder!r}, "
                "so they would not train the embedding. Add it where the subject is named (e.g. 'a photo of "
                f"{placeholder} on a beach'), or remove metadata.csv to train with prompt templates."
            )
    examples = [Example(folder / name, captions[name]) for name in sorted(names & captions.keys())]
    return examples, errors


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images resized so the shorter side is `resolution`, cropped square, scaled to [-1, 1].

    Randomness (random crop, flip, template choice) uses torch's global generator, so a seeded run is reproducible.
    """

    def __init__(self, examples: list[Example], config: TrainConfig, templates_subject: str | None = None):
        self.examples = examples
        self.resolution = config.resolution
        self.center_crop = config.center_crop
        self.random_flip = config.random_flip
        self.templates = STYLE_TEMPLATES if config.learnable_property == "style" else OBJECT_TEMPLATES
        self.templates_subject = templates_subject

    def __len__(self) -> int:
        return len(self.examples)

    def _caption(self, example: Example) -> str:
        if example.caption is not None:
            return example.caption
        if self.templates_subject is None:
            raise ValueError(f"{example.image_path} has no caption and no template subject was given.")
        template = self.templates[int(torch.randint(len(self.templates), ()))]
        return template.format(self.templates_subject)

    def _pixels(self, path: Path) -> torch.Tensor:
        image = _load_rgb(path)
        scale = self.resolution / min(image.size)
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        if self.center_crop:
            left, top = (size[0] - self.resolution) // 2, (size[1] - self.resolution) // 2
        else:
            left = int(torch.randint(size[0] - self.resolution + 1, ()))
            top = int(torch.randint(size[1] - self.resolution + 1, ()))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and bool(torch.rand(()) < 0.5):
            image = ImageOps.mirror(image)
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = array.view(self.resolution, self.resolution, 3).permute(2, 0, 1).float()
        return pixels / 127.5 - 1.0

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        return {"pixel_values": self._pixels(example.image_path), "caption": self._caption(example)}


def tag_frequency(examples: list[Example]) -> dict[str, int]:
    """Tag counts as kohya writes `ss_tag_frequency`: captions split on `,`, stripped, lowercased, once per image."""
    counts: dict[str, int] = {}
    for example in examples:
        tags = {tag.strip().lower() for tag in (example.caption or "").split(",") if tag.strip()}
        for tag in tags:
            counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def dataset_summary(config: TrainConfig, examples: list[Example]) -> dict:
    """What the LoRA metadata records about the data: folder name, repeats, image count, tag frequency."""
    name = Path(config.train_data_dir).resolve().name
    return {
        "dataset_dirs": {name: {"n_repeats": 1, "img_count": len(examples)}},
        "tag_frequency": {name: tag_frequency(examples)},
        "num_images": len(examples),
    }


def write_metadata(folder: Path, rows: list[dict[str, str]], caption_column: str = "text") -> Path:
    """Writes `folder/metadata.csv` (`file_name,<caption_column>`) from rows of those two keys."""
    path = folder / "metadata.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", caption_column])
        writer.writeheader()
        writer.writerows(rows)
    return path
