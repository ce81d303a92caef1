"""Image folder -> `metadata.csv` (`file_name,text`) through a small `Captioner` protocol.

Backends: `template` (no model: `"a photo of {trigger}"`), `openclip` (zero-shot tags: cosine similarity between the
image and `"a photo of {tag}"` for every tag of a vocabulary, top-k above a threshold) and `blip` (a BLIP captioner
through transformers). Existing captions are kept unless asked to overwrite; the CSV is written atomically and read
back by `sdtune train` as is.

Labeling never downloads. A model is a local path, or a hub name / open_clip pretrained tag whose files are already in
the local Hugging Face cache (looked up on disk, no request); anything else is refused when the captioner is built,
with the way out, and models load with the hub switched to offline mode, so nothing waits on a network. The template
backend only needs file names and never opens an image; the model backends decode every image they caption before
loading the model and refuse (or, with `bad_images="skip"`, leave out) the ones that do not decode, as training does.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from PIL import Image
from tqdm import tqdm

from sdtune import data
from sdtune.config import IMAGE_SUFFIXES
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

# A small general vocabulary for the open_clip tagger; pass your own with `--tags FILE` (one tag per line).
DEFAULT_TAGS = (
    "person", "man", "woman", "child", "face", "portrait", "full body", "smiling", "hat", "glasses", "dress", "suit",
    "dog", "cat", "bird", "horse", "animal", "flower", "tree", "grass", "forest", "mountain", "sky", "clouds",
    "sunset", "beach", "sea", "river", "snow", "city", "street", "building", "house", "room", "table", "chair",
    "car", "bicycle", "boat", "food", "fruit", "cup", "book", "toy", "robot", "statue", "painting", "drawing",
    "sketch", "anime", "cartoon", "3d render", "photo", "black and white", "night", "indoors", "outdoors",
    "close-up", "red", "blue", "green", "yellow", "white", "black",
)  # fmt: skip
_NEVER_DOWNLOADS = "sdtune label never downloads"
# open_clip's pretrained-tag preprocessing keys -> its create_model_and_transforms arguments.
_TAG_PREPROCESS = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation"}
_TAG_PREPROCESS |= {"resize_mode": "image_resize_mode"}
_OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's hub file names


class LabelError(SdtuneError, ValueError):
    """A folder, metadata.csv, model or option that cannot be used for labeling."""


class Captioner(Protocol):
    """Turns images into caption text (one per image, in order).

    `needs_images` False: `caption` only counts its input, and `label_folder` passes the file paths unopened (an
    object without the attribute gets decoded images).
    """

    needs_images: ClassVar[bool]

    def caption(self, images: list[Image.Image]) -> list[str]: ...


@dataclass
class TemplateCaptioner:
    """The same caption for every image, e.g. `"a photo of {trigger}"` (needs no model, never opens an image)."""

    needs_images: ClassVar[bool] = False
    template: str = "a photo of {trigger}"
    trigger: str = ""

    def __post_init__(self):
        try:
            self.template.format(trigger=self.trigger)
        except (KeyError, IndexError, ValueError) as error:
            raise LabelError(
                f"--template {self.template!r}: only {{trigger}} can be filled in ({type(error).__name__}: {error}); "
                "write a literal brace as {{ or }}."
            ) from error

    def caption(self, images: Sequence[object]) -> list[str]:
        """`template` with `{trigger}` filled, once per item of `images` (file paths or pixels, never opened)."""
        return [self.template.format(trigger=self.trigger).strip()] * len(images)


@dataclass
class OpenClipTagger:
    """Zero-shot tags from an open_clip model: each tag's score is the cosine similarity between the image embedding
    and the text embedding of `"a photo of {tag}"`; the `top_k` best scores at or above `threshold` become tags.

    Raises:
        LabelError: (when built) an unknown model, missing or uncached weights, an empty vocabulary, a bad `top_k` or
            device.
    """

    needs_images: ClassVar[bool] = True
    model_name: str
    pretrained: str | None  # a local checkpoint file, or an open_clip pretrained tag already in the local cache
    tags: tuple[str, ...] = DEFAULT_TAGS
    top_k: int = 5
    threshold: float = -1.0
    device: str = "cpu"
    _model: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.top_k < 1:
            raise LabelError(f"--top-k {self.top_k}: must be at least 1 (tags per image).")
        if not self.tags:
            raise LabelError("the tag vocabulary is empty; give --tags a file with one tag per line.")
        _check_device(self.device)
        self._checkpoint, self._preprocess = _openclip_weights(self.model_name, self.pretrained)

    def _load(self):
        if self._model is None:
            import open_clip

            what = f"--model {self.model_name}" + (f" --pretrained {self.pretrained}" if self.pretrained else "")
            with _loading(what, "pass a checkpoint of that model (or the --model that matches the checkpoint)"):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    self.model_name, pretrained=self._checkpoint, **self._preprocess
                )
                tokens = open_clip.get_tokenizer(self.model_name)([f"a photo of {tag}" for tag in self.tags])
            model.eval().to(self.device)
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
    """Sentence captions from a BLIP model through transformers (`BlipForConditionalGeneration`), greedy decoding.

    Raises:
        LabelError: (when built) `model_path` is neither a BLIP model folder nor a hub name in the local cache, or a
            bad device.
    """

    needs_images: ClassVar[bool] = True
    model_path: str  # a local model folder, or a hub name already in the local Hugging Face cache
    max_new_tokens: int = 30
    device: str = "cpu"
    _model: object = field(default=None, repr=False)

    def __post_init__(self):
        _check_device(self.device)
        self._folder = _blip_folder(self.model_path)

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One greedy-decoded caption per image."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if self._model is None:
            with _loading(f"--model {self.model_path}", "pass a complete BLIP captioning folder (save_pretrained)"):
                processor = BlipProcessor.from_pretrained(self._folder, local_files_only=True)
                model = BlipForConditionalGeneration.from_pretrained(self._folder, local_files_only=True)
            self._model = (processor, model.eval().to(self.device))
        processor, model = self._model
        inputs = processor(images=[image.convert("RGB") for image in images], return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Inside, every Hugging Face Hub request fails at once instead of being tried (and retried): loads read the
    local files they were pointed at, and whatever else they look for must already be cached."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE, os.environ["HF_HUB_OFFLINE"] = True, "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[1]


@contextlib.contextmanager
def _loading(what: str, fix: str) -> Iterator[None]:
    """Offline; any failure of the third-party loader becomes a LabelError naming `what` (they raise many types)."""
    try:
        with _hub_offline():
            yield
    except Exception as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise LabelError(f"{what}: cannot be loaded ({reason}); {fix}.") from error


def _hub_file(repo_id: str, filename: str) -> str | None:
    """The local path of `repo_id`/`filename` in the Hugging Face cache, or None (read from disk, no request)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # HFValidationError: not a repo id at all
        return None
    return found if isinstance(found, str) else None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _check_device(device: str) -> None:
    """A torch device that exists here."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise LabelError(f"--device {device!r}: not a torch device ({error}); e.g. cpu, cuda, cuda:1, mps.") from error
    count = torch.cuda.device_count() if parsed.type == "cuda" else 0
    if parsed.type == "cuda" and (count == 0 or (parsed.index or 0) >= count):
        raise LabelError(f"--device {device}: this machine has {count} CUDA device(s); use --device cpu.")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise LabelError(f"--device {device}: MPS is not available here; use --device cpu.")


def _blip_folder(model: str) -> Path:
    """The local BLIP folder `model` names: a folder, or a hub name's snapshot in the local cache."""
    path = Path(model).expanduser()
    cached = _hub_file(model, "config.json") if not path.exists() else None
    if cached:
        path = Path(cached).parent
    elif not path.exists():
        raise LabelError(
            f"--model {model}: no such folder, and not a hub model in the local Hugging Face cache ({_hub_cache()}); "
            f"{_NEVER_DOWNLOADS}. Download it once with network (`hf download {model}`), or pass a local folder: "
            "--model /path/to/blip-model-folder."
        )
    config = path / "config.json"
    if not config.is_file():
        what = "is a file" if path.is_file() else "has no config.json"
        raise LabelError(
            f"--model {model}: {what}; a BLIP model is a folder as save_pretrained writes it (config.json, weights, "
            "preprocessor and tokenizer files)."
        )
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (UnicodeDecodeError, ValueError, AttributeError) as error:
        raise LabelError(f"--model {model}: {config} is not a JSON object ({error}).") from error
    if model_type != "blip":
        raise LabelError(
            f"--model {model}: a {model_type!r} model, not BLIP ({config}); pass a BLIP captioning model, e.g. one "
            "saved from Salesforce/blip-image-captioning-base."
        )
    return path


def register_openclip_config(path: str | Path) -> str:
    """Makes an open_clip architecture from a JSON file known to open_clip, under the file's stem.

    Args:
        path: A JSON file with `embed_dim`, `vision_cfg` and `text_cfg`, as open_clip's model configs.

    Returns:
        The model name to pass as `--model` (the file name without `.json`).

    Raises:
        LabelError: The file is missing or not such a JSON object.
    """
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise LabelError(f"--model-config {path}: cannot be read as JSON ({error}); check the path.") from error
    missing = [
        key for key in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(config, dict) or key not in config
    ]
    if missing:
        raise LabelError(f"--model-config {path}: no {', '.join(missing)}; it must be an open_clip model config.")
    import open_clip  # seconds to import: only for the openclip backend

    open_clip.add_model_config(str(path))
    return path.stem


def read_tags(path: str | Path) -> tuple[str, ...]:
    """The tag vocabulary of a text file, one tag per line (blank lines skipped).

    Raises:
        LabelError: The file is missing, not UTF-8, or holds no tag.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise LabelError(
            f"--tags {path}: cannot be read ({error}); give a UTF-8 text file, one tag per line."
        ) from error
    tags = tuple(line.strip() for line in lines if line.strip())
    if not tags:
        raise LabelError(f"--tags {path}: holds no tag; write one tag per line.")
    return tags


def _openclip_model(model: str) -> str:
    """The open_clip built-in model name of `model`, or the LabelError that says which exist."""
    import open_clip

    name = model.replace("/", "-")  # as open_clip looks it up
    if name in open_clip.list_models():
        return name
    close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    folder = f"; for the folder {model}, write --model local-dir:{model}" if Path(model).is_dir() else ""
    raise LabelError(
        f"--model {model}: not an open_clip model{hint}{folder}. Use a name of open_clip.list_models(), "
        "--model-config FILE.json for another architecture (the model is then named after the file), "
        "hf-hub:ORG/REPO (already cached) or local-dir:FOLDER."
    )


def _openclip_weights(model: str, pretrained: str | None) -> tuple[str | None, dict]:
    """(local checkpoint file for open_clip's `pretrained`, preprocessing arguments of its tag), files on disk only."""
    if model.startswith(("hf-hub:", "local-dir:")):
        if pretrained:
            raise LabelError(f"--pretrained {pretrained}: --model {model} brings its own weights; drop --pretrained.")
        _check_openclip_folder(model)
        return None, {}
    import open_clip

    name = _openclip_model(model)
    tags = open_clip.list_pretrained_tags_by_model(name)
    more = f" and {len(tags) - 6} more: open_clip.list_pretrained_tags_by_model('{name}')" if len(tags) > 6 else ""
    known = f"tags of {name}: {', '.join(tags[:6])}{more}" if tags else f"open_clip has no pretrained tag for {name}"
    if not pretrained:
        raise LabelError(
            f"--backend openclip needs --pretrained: without weights {name} is random and its tags are noise. Pass "
            f"a local file (--pretrained /path/to/open_clip_pytorch_model.bin) or a tag already cached ({known})."
        )
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), {}
    if path.exists():
        raise LabelError(f"--pretrained {pretrained}: a folder; pass the checkpoint file (.bin, .pt, .safetensors).")
    config = open_clip.get_pretrained_cfg(name, pretrained)
    if not config:
        raise LabelError(
            f"--pretrained {pretrained}: no such file, and not a pretrained tag ({known}); pass an existing "
            "checkpoint file or one of those tags."
        )
    preprocess = {_TAG_PREPROCESS[key]: value for key, value in config.items() if key in _TAG_PREPROCESS and value}
    return _cached_tag(name, pretrained, config), preprocess


def _cached_tag(name: str, tag: str, config: dict) -> str:
    """The cached weights file of open_clip's pretrained `tag` of `name` (the files open_clip would download)."""
    repo, filename = os.path.split(config.get("hf_hub") or "")
    filename = filename or _OPENCLIP_WEIGHTS[1]
    if repo:
        found = next(filter(None, (_hub_file(repo, candidate) for candidate in _weight_files(filename))), None)
        if found:
            return found
        where, fetch = f"{repo}/{filename} in the Hugging Face cache {_hub_cache()}", f"hf download {repo} {filename}"
    else:  # a URL-only tag: open_clip keeps the download in ~/.cache/clip
        url = config.get("url", "")
        local = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if local.is_file():
            return str(local)
        where, fetch = str(local), f"download {url} to {local}"
    raise LabelError(
        f"--pretrained {tag}: the {name} weights of tag {tag!r} are not on this machine (looked for {where}) and "
        f"{_NEVER_DOWNLOADS}. Download them once with network (`{fetch}`), or pass a local file: "
        "--pretrained /path/to/open_clip_pytorch_model.bin."
    )


def _weight_files(filename: str) -> tuple[str, ...]:
    """The files open_clip tries for a hub weights file, in its order: the safetensors twin first."""
    if filename == _OPENCLIP_WEIGHTS[1]:
        return _OPENCLIP_WEIGHTS
    if filename.endswith((".bin", ".pth")):
        return filename[:-4] + ".safetensors", filename
    return (filename,)


def _check_openclip_folder(model: str) -> None:
    """`local-dir:FOLDER` holds open_clip_config.json; `hf-hub:REPO` has its config and weights in the local cache."""
    schema, _, identifier = model.partition(":")
    if schema == "local-dir":
        folder = Path(identifier).expanduser()
        weights = [path for suffix in ("safetensors", "bin", "pth") for path in folder.glob(f"*.{suffix}")]
        if not ((folder / "open_clip_config.json").is_file() and weights):  # no weights: open_clip would go random
            raise LabelError(
                f"--model {model}: {identifier} is not a folder with open_clip_config.json and weights (.safetensors, "
                ".bin or .pth); pass the folder of an open_clip model."
            )
        return
    weights = any(_hub_file(identifier, filename) for filename in _OPENCLIP_WEIGHTS)
    if not (weights and _hub_file(identifier, "open_clip_config.json")):
        raise LabelError(
            f"--model {model}: not in the local Hugging Face cache ({_hub_cache()}) and {_NEVER_DOWNLOADS}. "
            f"Download it once with network (`hf download {identifier}`), or pass a local folder: "
            "--model local-dir:/path/to/open-clip-folder (or a model name with --pretrained /path/to/file.bin)."
        )


@dataclass
class LabelResult:
    """What `label_folder` did."""

    path: Path  # the metadata.csv written
    written: int  # captions produced now
    kept: int  # existing captions left as they were
    tag_frequency: dict[str, int]  # over every caption in the file, as kohya counts tags
    skipped: list[str] = field(default_factory=list)  # images left uncaptioned with bad_images="skip" (with why)


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


def folder_images(folder: Path) -> list[Path]:
    """The images directly inside `folder`, sorted by name.

    Raises:
        LabelError: `folder` does not exist, is a file, or holds no image.
    """
    folder = Path(folder)
    if not folder.exists():
        raise LabelError(f"{folder}: no such folder; check the path.")
    if not folder.is_dir():
        raise LabelError(f"{folder}: a file, not a folder; give the folder that holds the images.")
    images = data.list_images(folder)
    if not images:
        raise LabelError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) to label.")
    return images


def _decodable(images: list[Path], bad_images: str, skipped: list[str]) -> list[Path]:
    """The images that decode completely; the others refuse the run (`error`) or are left out and listed (`skip`)."""
    problems = {}
    for image in tqdm(images, desc="checking images", unit="img", disable=len(images) < 200):
        problem = data.check_image(image, None)
        if problem:
            problems[image] = problem
    if problems and bad_images == "error":
        listed = "\n  ".join(problems.values())
        raise LabelError(
            f"{len(problems)} image(s) cannot be read:\n  {listed}\nreplace or move them, or pass --bad-images skip "
            "to caption the others."
        )
    for problem in problems.values():
        logger.warning("skipped %s", problem)
    skipped += problems.values()
    return [image for image in images if image not in problems]


def _check_options(batch_size: int, caption_column: str, bad_images: str) -> None:
    if batch_size < 1:
        raise LabelError(f"--batch-size {batch_size}: must be at least 1.")
    if not caption_column.strip() or caption_column == "file_name":
        raise LabelError(f"--caption-column {caption_column!r}: name the caption column, e.g. text.")
    if bad_images not in ("error", "skip"):
        raise LabelError(f"--bad-images {bad_images!r}: use error or skip.")


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
    bad_images: str = "error",
) -> LabelResult:
    """Writes or updates `folder/metadata.csv`: a caption for every image that has none (all with `overwrite`),
    other rows and columns kept. A model captioner sees the images as training reads them (EXIF rotation, alpha over
    white), each decoded and checked before the first batch; a captioner that does not need them never opens them.

    Args:
        bad_images: For a captioner that needs images, what an image that does not decode does: `error` refuses the
            run (listing every such image), `skip` leaves it uncaptioned and lists it in `LabelResult.skipped`.

    Raises:
        LabelError: A missing folder, a file, no images, a bad option, an existing metadata.csv that cannot be read,
            or (with `bad_images="error"`) images that do not decode.
    """
    folder = Path(folder)
    images = folder_images(folder)
    _check_options(batch_size, caption_column, bad_images)
    path = folder / "metadata.csv"
    columns, rows = _read_rows(path, caption_column)
    todo = [p for p in images if overwrite or not (rows.get(p.name) or {}).get(caption_column, "").strip()]
    kept, skipped, needs_images = len(images) - len(todo), [], getattr(captioner, "needs_images", True)
    if needs_images:
        todo = _decodable(todo, bad_images, skipped)
    for start in tqdm(range(0, len(todo), batch_size), desc="labeling", unit="batch", disable=not progress):
        batch = todo[start : start + batch_size]
        inputs = [data.load_rgb(p) for p in batch] if needs_images else batch
        for image, body in zip(batch, captioner.caption(inputs), strict=True):
            rows.setdefault(image.name, {"file_name": image.name})[caption_column] = compose_caption(
                body, trigger, prefix, suffix
            )
    data.write_metadata(folder, [rows[name] for name in sorted(rows)], tuple(columns))
    captions = [data.Example(folder / name, row.get(caption_column, "")) for name, row in rows.items()]
    return LabelResult(path, len(todo), kept, data.tag_frequency(captions), skipped)
