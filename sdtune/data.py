"""Training data: image folders with `metadata.csv` captions (the diffusers / HF imagefolder convention).

`scan_dataset` checks everything it can without loading a model (files exist and decode, the CSV has the right
columns, captions name the placeholder) and returns the examples; `ImageCaptionDataset` turns them into tensors.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sdtune import atomic
from sdtune.config import IMAGE_SUFFIXES, SUBSET_KEYS, Subset, TrainConfig

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
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training image and its caption (None: the caption comes from the TI templates), in its subset."""

    image_path: Path
    caption: str | None
    subset: Subset | None = None
    caption_origin: str = "none"  # "metadata", "file", "class tokens" or "none" (templates / empty prompt)
    size: tuple[int, int] | None = None  # (width, height) as displayed (EXIF rotation applied)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_metadata(path: Path, caption_column: str) -> tuple[dict[str, str | None], list[str]]:
    """Reads a `file_name,<caption_column>` CSV. Returns (file name -> caption, problems found); a row whose caption
    is empty maps to None (no caption: class tokens or an error, never an empty training caption)."""
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
        captions[name] = (row.get(caption_column) or "").strip() or None
    return captions, errors


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied (orientations 5-8 swap the sides)."""
    width, height = image.size
    return (height, width) if image.getexif().get(0x0112) in (5, 6, 7, 8) else (width, height)


def _size_or_none(path: Path) -> tuple[int, int] | None:
    """The displayed size, or None for a file `check_image` reports as unreadable."""
    try:
        with Image.open(path) as image:
            return displayed_size(image)
    except Exception:  # reported by check_image with its reason
        return None


def check_image(path: Path, resolution: int | None) -> str | None:
    """Why an image cannot be trained on (None when it can): it does not decode completely (truncated, not an image),
    it is larger than PIL decodes safely, or its shorter side is under an eighth of `resolution` (it would be
    upscaled more than 8x; not checked while the resolution is not known)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decodes every pixel: truncated files fail here, not mid-training
                width, height = displayed_size(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        return f"{path}: too large to decode safely ({error}); downscale it."
    except Exception as error:  # PIL raises many types for damaged or non-image files
        return f"{path}: not a readable image ({type(error).__name__}: {error})."
    if resolution and min(width, height) * 8 < resolution:
        return (
            f"{path}: {width}x{height} would be upscaled more than 8x to reach resolution {resolution} (blurry); "
            "use a larger image or a lower resolution."
        )
    return None


KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
# Subset settings an unset value of takes from the top-level key of the same name (a top-level `metadata_path` names
# the CSV of `train_data_dir` itself, not of every subset).
_INHERITED = tuple(key for key in SUBSET_KEYS if key not in ("image_dir", "metadata_path", "is_reg"))


def _inherit(subset: Subset, top: dict) -> Subset:
    """The subset with every unset setting taken from `top` (the top-level values)."""
    return dataclasses.replace(subset, **{key: top[key] for key in _INHERITED if getattr(subset, key) is None})


def resolve_subsets(config: TrainConfig) -> tuple[list[Subset], list[str]]:
    """The image folders a config trains on: its `subsets`, the kohya repeat folders (`10_mychar woman/`) inside
    `train_data_dir`, or `train_data_dir` itself; then the regularization folders of `reg_data_dir` (same rules).
    Unset subset settings take the top-level values; a repeat folder takes its repeats and class tokens from its
    name. Returns (subsets, problems)."""
    top = {key: getattr(config, key) for key in _INHERITED}
    subsets, errors = [], []
    if config.subsets:
        subsets = [_inherit(subset, top) for subset in config.subsets]
    else:
        subsets, errors = _folder_subsets(Path(config.train_data_dir), top, "train_data_dir", config.metadata_path)
    if config.reg_data_dir:
        reg_subsets, reg_errors = _folder_subsets(Path(config.reg_data_dir), top, "reg_data_dir", is_reg=True)
        subsets, errors = subsets + reg_subsets, errors + reg_errors
    return subsets, errors


def _folder_subsets(root: Path, top: dict, setting: str, metadata_path: str | None = None, is_reg: bool = False):
    """(subsets, problems) of one data folder: its kohya repeat folders, or the folder itself."""
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    repeat_folders = [p for p in folders if KOHYA_FOLDER.match(p.name)]
    if not repeat_folders:
        return [Subset(str(root), metadata_path=metadata_path, is_reg=is_reg, source=setting, **top)], []
    errors = []
    if list_images(root):
        errors.append(
            f"{setting}: {root} holds images next to kohya repeat folders ({repeat_folders[0].name}, ...); "
            f"those images would not be trained. Move them into a repeat folder such as 1_{root.name}/."
        )
    others = [p.name for p in folders if not KOHYA_FOLDER.match(p.name)]
    if others:
        errors.append(
            f"{setting}: {root} has folders that are not repeat folders (`<repeats>_<class tokens>`): "
            f"{_listing(others)}; they would not be trained. Rename them (e.g. 1_{others[0]}) or move them out."
        )
    subsets = []
    for folder in repeat_folders:
        repeats, tokens = KOHYA_FOLDER.match(folder.name).groups()
        settings = {**top, "num_repeats": int(repeats), "class_tokens": tokens}
        subsets.append(Subset(str(folder), is_reg=is_reg, source=setting, **settings))
    return subsets, errors


def _metadata_file(subset: Subset) -> Path:
    """The subset's captions CSV: `metadata_path`, else `metadata.csv` in its folder (which may not exist)."""
    return Path(subset.metadata_path) if subset.metadata_path else subset.folder / "metadata.csv"


def _uses_metadata(subset: Subset) -> bool:
    """Whether `_subset_captions` reads a metadata CSV for this subset (after a successful scan)."""
    if subset.caption_source != "auto":
        return subset.caption_source == "metadata"
    return _metadata_file(subset).is_file()


def _caption_files(subset: Subset, images: list[Path]) -> tuple[dict[str, str], list[str]]:
    captions, errors = {}, []
    for image in images:
        path = image.with_suffix(subset.caption_extension)
        if path.is_file():
            try:
                captions[image.name] = path.read_text(encoding="utf-8-sig").strip() or None
            except UnicodeDecodeError as error:
                errors.append(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8.")
    return captions, errors


def _wrong_extension_hint(subset: Subset) -> str | None:
    """The kohya pitfall: captions saved as `.caption` (or `.txt`) while the other extension is configured."""
    for extension in (".caption", ".txt", ".tags"):
        if extension != subset.caption_extension and any(subset.folder.glob(f"*{extension}")):
            return (
                f"{subset.folder} has {extension} files but caption_extension is {subset.caption_extension!r}, "
                f"so they would be ignored. Set caption_extension: {extension}."
            )
    return None


def _subset_captions(subset: Subset, images: list[Path]) -> tuple[dict[str, str] | None, list[str]]:
    """(file name -> caption, problems); None when the subset has no captions at all."""
    metadata = _metadata_file(subset) if _metadata_file(subset).is_file() else None
    files, errors = _caption_files(subset, images)
    has_files = any(image.with_suffix(subset.caption_extension).is_file() for image in images)
    source = subset.caption_source
    if source == "auto":
        if metadata and has_files:
            return None, [
                f"{subset.folder}: has both {metadata.name} and {len(files)} {subset.caption_extension} caption "
                "file(s); sdtune would have to ignore one. Set caption_source: metadata or caption_source: files."
            ]
        source = "metadata" if metadata else "files" if has_files else None
    if source == "metadata":
        if metadata is None:
            return None, [f"{subset.folder}: caption_source is metadata but there is no metadata.csv."]
        captions, csv_errors = read_metadata(metadata, subset.caption_column)
        mismatch = _metadata_mismatch(metadata, captions, images, subset) if captions or not csv_errors else []
        return captions, errors + csv_errors + mismatch
    if source == "files":
        missing = [p.name for p in images if not p.with_suffix(subset.caption_extension).is_file()]
        empty = [p.name for p in images if p.name not in missing and files.get(p.name, "") is None]
        for names, what in ((missing, "no"), (empty, "an empty")):
            if names and not subset.class_tokens:
                errors.append(
                    f"{subset.folder}: {what} {subset.caption_extension} caption for {_listing(names)}; write "
                    "them, or set class_tokens to caption those images."
                )
        return files, errors
    hint = _wrong_extension_hint(subset)
    return None, errors + ([hint] if hint else [])


def _metadata_mismatch(path: Path, captions: dict[str, str], images: list[Path], subset: Subset) -> list[str]:
    if not captions:
        return [f"metadata_path: {path} has no rows."]
    names = {p.name for p in images}
    errors = []
    missing = sorted(name for name in captions if name not in names)
    if missing:
        errors.append(f"metadata_path: {path} names files not in {subset.folder}: {_listing(missing)}.")
    uncaptioned = sorted(name for name in names if name not in captions)
    if uncaptioned and not subset.class_tokens:
        errors.append(
            f"metadata_path: {path} has no row for {_listing(uncaptioned)}; add rows, move the images out, or set "
            "class_tokens to caption them."
        )
    empty = sorted(name for name in names if name in captions and captions[name] is None)
    if empty and not subset.class_tokens:
        errors.append(
            f"metadata_path: {path}: the {subset.caption_column!r} value of {_listing(empty)} is empty; write the "
            "captions, move the images out, or set class_tokens to caption them."
        )
    return errors


def full_caption(caption: str | None, subset: Subset | None) -> str | None:
    """A caption with the subset's prefix and suffix (joined with `, `); None stays None (templates)."""
    if caption is None or subset is None:
        return caption
    parts = [subset.caption_prefix, caption, subset.caption_suffix]
    return ", ".join(part for part in parts if part)


def _image_problems(images: list[Path], resolution: int, bad_images: str, skipped: list[str] | None):
    """(problems, usable images): with `bad_images: skip` a bad image is left out and listed in `skipped`."""
    problems = {}
    for image in tqdm(images, desc="checking images", unit="img", disable=len(images) < 200):
        problem = check_image(image, resolution)
        if problem:
            problems[image] = problem
    if bad_images == "error":
        fix = " (or set bad_images: skip to train without them)" if problems else ""
        return [problem + fix for problem in problems.values()], images
    for problem in problems.values():
        logger.warning("skipped %s", problem)
    if skipped is not None:
        skipped += problems.values()
    return [], [image for image in images if image not in problems]


def scan_subset(
    subset: Subset, placeholder: str | None, resolution: int = 512, bad_images: str = "error", skipped=None
) -> tuple[list[Example], list[str]]:
    """The examples of one subset (each image once) and every problem found; bad images are problems, or are left
    out and listed in `skipped` with `bad_images: skip`."""
    if not subset.folder.is_dir():
        return [], [f"{subset.source}: {subset.folder} is not a folder (missing or a file); check the path."]
    images = list_images(subset.folder)
    if not images:
        return [], [f"{subset.source}: {subset.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})."]
    errors, images = _image_problems(images, resolution, bad_images, skipped)
    if not images:
        return [], errors + [f"{subset.source}: {subset.folder}: no usable image left."]
    captions, caption_errors = _subset_captions(subset, images)
    errors += caption_errors
    examples = []
    origin = "metadata" if _uses_metadata(subset) else "file"
    for image in images:
        caption = captions.get(image.name) if captions is not None else None
        found = origin if caption is not None else "none"
        if caption is None and subset.class_tokens:
            caption, found = subset.class_tokens, "class tokens"
        examples.append(Example(image, caption, subset, found, _size_or_none(image)))
    if placeholder:
        texts = {e.image_path.name: full_caption(e.caption, subset) for e in examples if e.caption is not None}
        lacking = sorted(name for name, text in texts.items() if placeholder not in text)
        if lacking:
            errors.append(
                f"{subset.folder}: the captions of {_listing(lacking)} lack placeholder_token {placeholder!r}, "
                "so they would not train the embedding. Add it where the subject is named (e.g. 'a photo of "
                f"{placeholder} on a beach' or caption_prefix: {placeholder}), or remove the captions to train with "
                "prompt templates."
            )
    return examples, errors


def scan_dataset(
    config: TrainConfig, placeholder: str | None, skipped: list[str] | None = None
) -> tuple[list[Example], list[str]]:
    """Finds the training examples of every subset and every problem with them, before any model is loaded.

    Args:
        config: The training config (folders, captions, subsets).
        placeholder: The TI placeholder every caption must name, or None.
        skipped: Collects the images `bad_images: skip` left out (with why).

    Returns:
        (examples, problems): each image once per repeat. Training must not start while problems is non-empty.
    """
    subsets, errors = resolve_subsets(config)
    examples, reg_examples = [], []
    for subset in subsets:
        needs = None if subset.is_reg else placeholder  # class images name the class, not the new token
        found, subset_errors = scan_subset(subset, needs, config.resolution, config.bad_images, skipped)
        target = reg_examples if subset.is_reg else examples
        target += [example for example in found for _ in range(subset.num_repeats)]
        errors += subset_errors
        uncaptioned = [e.image_path.name for e in found if subset.is_reg and e.caption is None]
        if uncaptioned:
            errors.append(
                f"{subset.folder}: regularization images {_listing(uncaptioned)} have no caption; name the "
                "folder like 1_woman (class tokens), set class_tokens, or write captions."
            )
    return examples + balance_reg_examples(reg_examples, len(examples)), errors


def balance_reg_examples(reg_examples: list[Example], train_samples: int) -> list[Example]:
    """Regularization samples for one epoch: as many as training samples, cycling through them when there are
    fewer and using the first ones when there are more (kohya's rule, so the prior term keeps a fixed share)."""
    if not reg_examples:
        return []
    if len(reg_examples) > train_samples:
        logger.info("%d regularization samples, %d used per epoch", len(reg_examples), train_samples)
    return [reg_examples[i % len(reg_examples)] for i in range(train_samples)]


def bucket_sizes(resolution: int, min_side: int, max_side: int, step: int) -> list[tuple[int, int]]:
    """Every (width, height) with sides multiples of `step` in [min_side, max_side] and the largest height for each
    width that keeps the area within `resolution`^2 (the kohya bucket set, both orientations)."""
    sizes = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (resolution * resolution // width) // step * step)
        if height >= min_side:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def assign_bucket(size: tuple[int, int], config: TrainConfig, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket an image of `size` trains at: the one whose aspect ratio is closest (log scale; ties to the
    larger area), or with `bucket_no_upscale` its own size scaled down to at most resolution^2 and rounded down to
    `bucket_reso_steps`, so no side is ever upscaled."""
    width, height = size
    if config.bucket_no_upscale:
        step = config.bucket_reso_steps
        scale = min(1.0, math.sqrt(config.resolution**2 / (width * height)))
        return (max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step))
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def bucket_plan(examples: list[Example], config: TrainConfig) -> dict:
    """Bucket per example, images per bucket and the aspect-ratio error (kohya's `ss_bucket_info`)."""
    buckets = bucket_sizes(config.resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps)
    assigned = [assign_bucket(example.size, config, buckets) for example in examples]
    errors = [abs(b[0] / b[1] - e.size[0] / e.size[1]) for b, e in zip(assigned, examples, strict=True)]
    counts: dict[tuple[int, int], int] = {}
    for bucket in assigned:
        counts[bucket] = counts.get(bucket, 0) + 1
    info = {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))}
    return {
        "assigned": assigned,
        "ss_bucket_info": {"buckets": info, "mean_img_ar_error": sum(errors) / max(1, len(errors))},
        "max_ar_error": max(errors, default=0.0),
    }


def describe_buckets(plan: dict) -> list[str]:
    """The dry-run lines for a `bucket_plan`: images per bucket size and the aspect-ratio error."""
    info = plan["ss_bucket_info"]
    sizes = ", ".join(f"{b['resolution'][0]}x{b['resolution'][1]}: {b['count']}" for b in info["buckets"].values())
    return [
        f"buckets (width x height: samples): {sizes}",
        f"aspect-ratio error (|bucket - image| width/height): mean {info['mean_img_ar_error']:.3f}, "
        f"max {plan['max_ar_error']:.3f}",
    ]


def example_seed(seed: int, epoch: int, index: int, purpose: str) -> int:
    """A 63-bit seed for the random draws of one example in one epoch (`purpose` separates independent streams).

    Keying every draw (crop, flip, caption options, noise, timestep) by (seed, epoch, example) instead of taking it
    from a global generator makes a run's result independent of how its batches are cut: the number of processes,
    gradient accumulation and dataloader workers change nothing, and a resumed run draws what the uninterrupted one
    would have.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class BucketBatches:
    """Batch sampler for a DataLoader: batches that share a bucket (one bucket for square crops), shuffled within
    buckets and in order by a generator seeded with `seed + epoch`, so any epoch's order can be rebuilt exactly
    (resume) and equal seeds give equal orders. `set_epoch(epoch, skip)` picks the epoch and how many of its batches
    were already used.

    With `num_processes` > 1 (data-parallel training) every process builds the same global batches of
    `batch_size x num_processes` samples and takes its own `batch_size` slice of each, so the processes together see
    exactly what one process with the larger batch would. A global batch too short to fill every slice (the last one
    of a bucket) is filled by repeating its own samples, so every process takes part in every step.

    Each item is `(dataset index, epoch)`: `ImageCaptionDataset` keys its random draws by them (`example_seed`).
    """

    def __init__(
        self,
        buckets: list[tuple[int, int]],
        batch_size: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
    ):
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.groups.setdefault(bucket, []).append(index)
        self.batch_size, self.seed, self.epoch, self.skip = batch_size, seed, 0, 0
        self.num_processes, self.process_index = num_processes, process_index

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Chooses the order of epoch `epoch`, starting after its first `skip` batches."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        size = self.batch_size * self.num_processes
        return sum(math.ceil(len(indices) / size) for indices in self.groups.values())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch (all processes together) of epoch `epoch`, in order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        size, batches = self.batch_size * self.num_processes, []
        for _, indices in sorted(self.groups.items()):
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            batches += [order[i : i + size] for i in range(0, len(order), size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def process_slice(self, batch: list[int]) -> list[int]:
        """This process's part of a global batch (all of it for one process)."""
        if self.num_processes == 1:
            return batch
        share = math.ceil(len(batch) / self.num_processes)
        start = self.process_index * share
        return [batch[i % len(batch)] for i in range(start, start + share)]

    def __iter__(self):
        for batch in self.epoch_batches(self.epoch)[self.skip :]:
            yield [(index, self.epoch) for index in self.process_slice(batch)]


def load_rgb(path: Path) -> Image.Image:
    """RGB pixels as a viewer shows them: EXIF rotation applied, transparency over white, 16-bit scaled to 8-bit,
    CMYK / palette / grayscale converted."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):  # 16/32-bit integer grayscale: convert() would clip at 255
            scale = 1 / 256 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 1
            image = image.convert("I").point(lambda value: value * scale).convert("L")
        if image.mode in ("RGBA", "LA", "P", "PA"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")


class LatentCache:
    """VAE latent distributions (mean, std) per (image content, training size, crop, flip, VAE), in memory and,
    with a `folder`, as `.safetensors` files there. The key hashes the image file's bytes, so an edited image never
    reuses a stale entry; a changed size, crop or VAE gives another key."""

    def __init__(self, folder: Path | None, vae_id: str):
        self.folder, self.vae_id = folder, vae_id
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._file_hashes: dict[Path, str] = {}
        self.encoded = 0  # entries computed by this process (the rest came from disk)

    def key(self, path: Path, size: tuple[int, int], flipped: bool) -> str:
        """The entry's name: sha256 over the image bytes' hash, size, crop mode, flip and VAE identity."""
        if path not in self._file_hashes:
            self._file_hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        text = f"{self._file_hashes[path]}|{size[0]}x{size[1]}|center|{int(flipped)}|{self.vae_id}"
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (mean, std), from memory or disk."""
        if key not in self.entries and self.folder is not None and (self.folder / f"{key}.safetensors").is_file():
            tensors = load_file(str(self.folder / f"{key}.safetensors"))
            self.entries[key] = (tensors["mean"], tensors["std"])
        return self.entries.get(key)

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Stores an entry (written atomically to disk when a folder is set)."""
        self.entries[key] = (mean.contiguous(), std.contiguous())
        self.encoded += 1
        if self.folder is not None:  # a cache: losing an entry to a crash costs one re-encode, so no fsync
            with atomic.atomic_file(self.folder / f"{key}.safetensors") as temporary:
                save_file({"mean": self.entries[key][0], "std": self.entries[key][1]}, str(temporary))


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images resized so the shorter side is `resolution`, cropped square, scaled to [-1, 1].

    Items are `(index, epoch)` (from `BucketBatches`; a plain index means epoch 0). Every random draw of an item
    (crop, flip, template choice, caption shuffle and dropout) comes from a generator seeded by `example_seed`, and
    the item carries `noise_seed` for the objective's draws (noise, timestep), so results do not depend on how
    items are batched or spread over processes.
    """

    def __init__(
        self,
        examples: list[Example],
        config: TrainConfig,
        templates_subject: str | None = None,
        sizes: list[tuple[int, int]] | None = None,
    ):
        self.examples = examples
        self.resolution = config.resolution
        self.sizes = sizes  # per example (width, height) with buckets; None: square `resolution`
        self.latent_cache: LatentCache | None = None  # set by `fill_latent_cache`
        self.center_crop = config.center_crop
        self.random_flip = config.random_flip
        self.templates = STYLE_TEMPLATES if config.learnable_property == "style" else OBJECT_TEMPLATES
        self.templates_subject = templates_subject
        self.seed = config.seed
        self.prior_loss_weight = config.prior_loss_weight

    def __len__(self) -> int:
        return len(self.examples)

    def _caption(self, example: Example, generator: torch.Generator) -> str:
        subset = example.subset
        dropout = subset.caption_dropout_rate if subset is not None else 0.0
        if dropout and bool(torch.rand((), generator=generator) < dropout):
            return ""
        if example.caption is None:
            if self.templates_subject is None:
                return ""  # LoRA without captions: the empty prompt
            template = self.templates[int(torch.randint(len(self.templates), (), generator=generator))]
            return template.format(self.templates_subject)
        caption = example.caption
        if subset is not None and subset.shuffle_caption:
            caption = shuffle_tags(caption, subset.keep_tokens, generator)
        return full_caption(caption, subset)

    def _placement(self, image_size: tuple[int, int], size: tuple[int, int], generator: torch.Generator | None):
        """(resized size, crop left, crop top) of an image of `image_size` trained at `size` (both width, height):
        resized to cover `size` (aspect kept), then cropped in the centre or at random."""
        (image_width, image_height), (width, height) = image_size, size
        scale = max(width / image_width, height / image_height)
        scaled = (max(width, round(image_width * scale)), max(height, round(image_height * scale)))
        if self.center_crop:
            return scaled, (scaled[0] - width) // 2, (scaled[1] - height) // 2
        left = int(torch.randint(scaled[0] - width + 1, (), generator=generator))
        top = int(torch.randint(scaled[1] - height + 1, (), generator=generator))
        return scaled, left, top

    def _pixels(
        self, path: Path, size: tuple[int, int], flip: bool | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels, time ids): the image resized to cover `size`, cropped to it, flipped (at random when `flip` is
        None), scaled to [-1, 1]; see `time_ids`."""
        image = load_rgb(path)
        width, height = size
        scaled, left, top = self._placement(image.size, size, generator)
        original = image.size
        image = image.resize(scaled, Image.Resampling.LANCZOS).crop((left, top, left + width, top + height))
        flipped = flip if flip is not None else self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        if flipped:
            image = ImageOps.mirror(image)
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = array.view(height, width, 3).permute(2, 0, 1).float() / 127.5 - 1.0
        return pixels, time_ids(original, scaled, (left, top), size, flipped)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        example, size = self.examples[index], self.size_of(index)
        generator = torch.Generator().manual_seed(example_seed(self.seed, epoch, index, "data"))
        if self.latent_cache is None:
            pixels, conditioning = self._pixels(example.image_path, size, generator=generator)
            drawn = {"pixel_values": pixels, "time_ids": conditioning}
        else:  # no crop draw: cached latents are centre crops
            flipped = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
            mean, std = self.latent_cache.get(self.latent_cache.key(example.image_path, size, flipped))
            scaled, left, top = self._placement(example.size, size, None)
            conditioning = time_ids(example.size, scaled, (left, top), size, flipped)
            drawn = {"latent_mean": mean, "latent_std": std, "time_ids": conditioning}
        noise_seed = example_seed(self.seed, epoch, index, "noise")
        weight = self.prior_loss_weight if _is_reg(example) else 1.0
        return {**drawn, "caption": self._caption(example, generator), "noise_seed": noise_seed, "loss_weight": weight}

    def size_of(self, index: int) -> tuple[int, int]:
        """(width, height) example `index` trains at."""
        return self.sizes[index] if self.sizes else (self.resolution, self.resolution)


def time_ids(
    original: tuple[int, int], scaled: tuple[int, int], crop: tuple[int, int], size: tuple[int, int], flipped: bool
) -> torch.Tensor:
    """SDXL's size and crop conditioning of one training image, `[original height, original width, crop top, crop
    left, target height, target width]`, as the SDXL paper and diffusers' training scripts define it.

    Args:
        original: (width, height) of the image as displayed, before resizing.
        scaled: (width, height) it was resized to (covering the training size).
        crop: (left, top) of the crop in the resized image, before any flip.
        size: (width, height) trained at (the bucket).
        flipped: Mirrored after cropping: the left crop is then what was cut from the right edge.
    """
    left, top = crop
    if flipped:
        left = scaled[0] - left - size[0]
    return torch.tensor([original[1], original[0], top, left, size[1], size[0]], dtype=torch.float32)


def fill_latent_cache(dataset: ImageCaptionDataset, cache: LatentCache, encode, batch_size: int = 8) -> None:
    """Encodes every (image, size, flip) the dataset can ask for that the cache lacks, with a progress bar, and
    makes the dataset read latents from the cache. `encode(pixels [n,3,h,w]) -> (mean, std)`."""
    flips = (False, True) if dataset.random_flip else (False,)
    todo: dict[str, tuple[Path, tuple[int, int], bool]] = {}
    for index, example in enumerate(dataset.examples):
        for flipped in flips:
            key = cache.key(example.image_path, dataset.size_of(index), flipped)
            if key not in todo and cache.get(key) is None:
                todo[key] = (example.image_path, dataset.size_of(index), flipped)
    by_size: dict[tuple[int, int], list[str]] = {}
    for key, (_, size, _) in todo.items():
        by_size.setdefault(size, []).append(key)
    with tqdm(total=len(todo), desc="caching latents", unit="img", disable=not todo) as bar:
        for keys in by_size.values():
            for start in range(0, len(keys), batch_size):
                chunk = keys[start : start + batch_size]
                pixels = torch.stack([dataset._pixels(todo[k][0], todo[k][1], todo[k][2])[0] for k in chunk])
                means, stds = encode(pixels)
                for key, mean, std in zip(chunk, means, stds, strict=True):
                    cache.put(key, mean.detach().cpu(), std.detach().cpu())
                bar.update(len(chunk))
    dataset.latent_cache = cache


def vae_latents(vae, folder: Path | None, base_id: str):
    """(a `LatentCache` for this VAE, the function that fills it) for `training_loader`'s `latents`: entries keyed
    by `base_id` (the base model's hash) and the VAE's dtype, kept in `folder` too when given."""

    def encode(pixels: torch.Tensor):
        with torch.no_grad():
            distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return distribution.mean.float(), distribution.std.float()

    return LatentCache(folder, f"{base_id}:{next(vae.parameters()).dtype}"), encode


def training_loader(config: TrainConfig, examples: list[Example], num_processes: int = 1, process_index: int = 0,
                    latents=None) -> tuple[torch.utils.data.DataLoader, dict]:  # fmt: skip
    """(loader, dataset summary for the metadata) of a training run.

    Batches come from `BucketBatches`: square crops in one bucket, or with `enable_bucket` each image at its bucket
    size, batches drawn within a bucket; the order of every epoch follows from the seed, so a resumed run continues
    exactly, and each of `num_processes` takes its slice of every global batch. With `latents` = (a `LatentCache`,
    its encode function) the dataset yields cached latent distributions instead of pixels.
    """
    summary = dataset_summary(config, examples)
    sizes, extra = None, {}
    if config.enable_bucket:
        plan = bucket_plan(examples, config)
        sizes, extra = plan["assigned"], {"bucket_info": plan["ss_bucket_info"]}
    dataset = ImageCaptionDataset(examples, config, config.placeholder_token, sizes=sizes)
    if latents is not None:
        fill_latent_cache(dataset, latents[0], latents[1], batch_size=config.batch_size)
    buckets = sizes or [(config.resolution, config.resolution)] * len(examples)
    sampler = BucketBatches(buckets, config.batch_size, config.seed, num_processes, process_index)
    # Its own generator: each new iterator (every epoch, and on resume) draws a worker base seed from it, which
    # would otherwise shift the global random stream.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU without a host sync
        generator=torch.Generator().manual_seed(config.seed),
    )
    return loader, {**summary, **extra, "batches_per_epoch": len(loader)}


def shuffle_tags(caption: str, keep_tokens: int, generator: torch.Generator | None = None) -> str:
    """The caption's comma-separated tags in a random order (from `generator`), the first `keep_tokens` in place."""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(kept + [rest[i] for i in order])


def tag_frequency(examples: list[Example]) -> dict[str, int]:
    """Tag counts as kohya writes `ss_tag_frequency`: captions split on `,`, stripped, lowercased, once per image."""
    counts: dict[str, int] = {}
    for example in examples:
        caption = full_caption(example.caption, example.subset) or ""
        tags = {tag.strip().lower() for tag in caption.split(",") if tag.strip()}
        for tag in tags:
            counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def dataset_summary(config: TrainConfig, examples: list[Example]) -> dict:
    """What the LoRA metadata records about the data (kohya's `ss_dataset_dirs`, `ss_reg_dataset_dirs`,
    `ss_tag_frequency`, `ss_num_train_images`, `ss_num_reg_images`): per subset folder its repeats, image count
    and tag counts; training samples per epoch (images x repeats); regularization images."""
    dirs: dict[str, dict] = {}
    reg_dirs: dict[str, dict] = {}
    frequencies: dict[str, dict[str, int]] = {}
    for subset, unique in _by_subset(examples).items():
        entry = {"n_repeats": subset.num_repeats, "img_count": len(unique)}
        (reg_dirs if subset.is_reg else dirs)[subset.name] = entry
        if not subset.is_reg:
            frequencies[subset.name] = tag_frequency(unique)
    return {
        "dataset_dirs": dirs,
        "reg_dataset_dirs": reg_dirs,
        "tag_frequency": frequencies,
        "num_images": sum(1 for example in examples if not _is_reg(example)),
        "num_reg_images": sum(entry["img_count"] for entry in reg_dirs.values()),
    }


def _is_reg(example: Example) -> bool:
    return example.subset is not None and example.subset.is_reg


def _by_subset(examples: list[Example]) -> dict[Subset, list[Example]]:
    """Each subset's examples once (without repeats), in order."""
    groups: dict[Subset, dict[Path, Example]] = {}
    for example in examples:
        groups.setdefault(example.subset, {}).setdefault(example.image_path, example)
    return {subset: list(unique.values()) for subset, unique in groups.items()}


def write_metadata(folder: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("file_name", "text")) -> Path:
    """Writes `folder/metadata.csv` with `columns` (`file_name` and a caption column, plus any others) from rows keyed
    by them (other keys are left out), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic.write_text(folder / "metadata.csv", buffer.getvalue(), durable=True)


def _caption_counts(examples: list[Example]) -> str:
    counts: dict[str, int] = {}
    for example in examples:
        counts[example.caption_origin] = counts.get(example.caption_origin, 0) + 1
    names = {"metadata": "from the metadata CSV", "file": "from caption files", "class tokens": "from class tokens"}
    names["none"] = "without a caption (TI templates / empty prompt)"
    return ", ".join(f"{count} {names[origin]}" for origin, count in counts.items())


def _caption_options(subset: Subset) -> str:
    options = [f"prefix {subset.caption_prefix!r}" if subset.caption_prefix else ""]
    options.append(f"suffix {subset.caption_suffix!r}" if subset.caption_suffix else "")
    options.append(f"shuffled, first {subset.keep_tokens} kept" if subset.shuffle_caption else "")
    options.append(f"dropout {subset.caption_dropout_rate:g}" if subset.caption_dropout_rate else "")
    return ", ".join(option for option in options if option) or "none"


def describe_dataset(examples: list[Example], top_tags: int = 8) -> list[str]:
    """The dry-run report per subset: folder, images, repeats, where captions came from, caption options, tags."""
    lines = []
    for number, (subset, unique) in enumerate(_by_subset(examples).items(), start=1):
        kind = ", regularization" if subset.is_reg else ""
        lines.append(f"subset {number}: {subset.folder} ({subset.source}{kind})")
        samples = len(unique) * subset.num_repeats
        lines.append(f"  {len(unique)} images x {subset.num_repeats} repeats = {samples} samples per epoch")
        lines.append(f"  captions: {_caption_counts(unique)}")
        lines.append(f"  caption options: {_caption_options(subset)}")
        tags = list(tag_frequency(unique).items())[:top_tags]
        if tags:
            lines.append("  top tags: " + ", ".join(f"{tag} ({count})" for tag, count in tags))
    reg_samples = sum(1 for example in examples if _is_reg(example))
    if reg_samples:
        lines.append(
            f"regularization: {reg_samples} samples per epoch (as many as training samples, repeated or cut), "
            "loss weighted by prior_loss_weight"
        )
    return lines
