"""Batch generation: prompts x seeds from the command line, a prompts file or a YAML/JSONL job file, written as PNGs
with A1111-style `parameters` text, a `manifest.jsonl` and an optional contact sheet.

Image `i` of a job is drawn from seed `seed + i` (as in A1111), whatever the batch size, so the same seed and
settings give the same image.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import random
import shlex
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml
from tqdm import tqdm

from sdtune import atomic, inference, prompts
from sdtune._version import __version__
from sdtune.config import yaml_problem
from sdtune.errors import SdtuneError
from sdtune.models import base_model_sha256

MANIFEST = "manifest.jsonl"
JOB_ALIASES = {"negative": "negative_prompt", "cfg_scale": "guidance", "num_images": "n"}
RANDOM_SEED = -1  # A1111's "random": a random seed is drawn and recorded with every image, as when none is given
# CLIP reads 75 tokens (a few hundred characters) per prompt; this is far beyond it, and keeps a pasted file out of
# every PNG's text and manifest line.
MAX_PROMPT_CHARS = 10_000
_LORA_ENTRY_KEYS = {"path", "name", "weight", "te", "unet"}
_EMBEDDING_ENTRY_KEYS = {"path", "name", "token"}


class JobError(SdtuneError, ValueError):
    """A job file or job setting that cannot be run."""


@dataclass
class Job:
    """One prompt with its settings; `n` images from seeds `seed`, `seed + 1`, ...

    Raises:
        JobError: A setting of the wrong type or out of range (every problem of the job, with the fix).
    """

    prompt: str
    negative_prompt: str = ""
    n: int = 1
    seed: int | None = None  # None or -1 (A1111's spelling): a random seed, recorded with every image
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None  # None: the base model's native size
    height: int | None = None
    sampler: str = "dpmpp_2m"
    clip_skip: int = 1  # as in A1111 and kohya: 1 = the text encoder's last layer, 2 = the penultimate
    loras: list = field(default_factory=list)  # "NAME_OR_PATH[:W[:UNET_W]]" or {path|name, weight, te, unet}
    embeddings: list = field(default_factory=list)  # "NAME_OR_PATH[:TOKEN]" or {path|name, token}

    def __post_init__(self):
        problems = _type_problems(self)
        if not problems:
            problems = [*_range_problems(self), *_prompt_problems(prompts.parse_prompt, self.prompt)]
            problems += _adapter_problems("loras", self.loras, _LORA_ENTRY_KEYS)
            problems += _adapter_problems("embeddings", self.embeddings, _EMBEDDING_ENTRY_KEYS)
        if problems:
            raise JobError("; ".join(problems))


JOB_FIELDS = {f.name: f for f in fields(Job)}


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_FIELD_TYPES = {  # field -> (test, what it must be)
    **dict.fromkeys(("prompt", "negative_prompt", "sampler"), (lambda v: isinstance(v, str), "text")),
    **dict.fromkeys(("n", "steps", "clip_skip"), (_is_whole, "a whole number")),
    **dict.fromkeys(("seed", "width", "height"), (lambda v: v is None or _is_whole(v), "a whole number")),
    "guidance": (_is_number, "a number"),
    **dict.fromkeys(("loras", "embeddings"), (lambda v: isinstance(v, list), "a list")),
}


def _type_problems(job: Job) -> list[str]:
    problems = []
    for name, (test, what) in _FIELD_TYPES.items():
        if not test(getattr(job, name)):
            problems.append(f"`{name}` must be {what} (got {shorten(repr(getattr(job, name)))})")
    return problems


def _range_problems(job: Job) -> list[str]:
    problems = [
        f"`{name}` is {len(text):,} characters; sdtune takes at most {MAX_PROMPT_CHARS:,} (the text encoder reads "
        "75 tokens, a few hundred characters, and the text is copied into every PNG and manifest line): shorten it"
        for name, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt))
        if len(text) > MAX_PROMPT_CHARS
    ]
    for name in ("n", "clip_skip"):
        if getattr(job, name) < 1:
            problems.append(f"`{name}` is {getattr(job, name)}; give 1 or more")
    if job.sampler not in inference.SAMPLERS:
        problems.append(f"sampler {job.sampler!r} is not one of {', '.join(inference.SAMPLERS)}")
    seeds = [] if job.seed in (None, RANDOM_SEED) else [job.seed, job.seed + max(job.n, 1) - 1]
    problems += inference.setting_problems(job.width, job.height, job.steps, job.guidance)
    if seeds and not 0 <= seeds[0] <= inference.MAX_SEED:
        problems.append(
            f"`seed` {job.seed} is outside 0..{inference.MAX_SEED} (2**64-1); -1 or no seed draws a random one"
        )
    elif seeds and seeds[1] > inference.MAX_SEED:
        problems.append(f"`seed` {job.seed} with `n` {job.n} runs past {inference.MAX_SEED} (2**64-1); lower the seed")
    return problems


def _adapter_problems(name: str, entries: list, keys: set[str]) -> list[str]:
    """Entries of `loras` / `embeddings`: text specs (LoRA weights that read as numbers), or mappings of known keys
    with text names and finite weights."""
    problems = []
    for entry in entries:
        if isinstance(entry, str):
            if name == "loras":
                target, numbers = split_spec(entry)
                problems += _prompt_problems(prompts.lora_weights, target, numbers, f"lora {entry!r}")
            continue
        if not isinstance(entry, dict):
            problems.append(f"`{name}` entry {shorten(repr(entry))} must be text or a mapping")
            continue
        unknown = sorted(set(map(str, entry)) - keys)
        if unknown:
            problems.append(f"`{name}` entry {entry!r}: unknown key {unknown[0]!r}; keys: {', '.join(sorted(keys))}")
        if not (entry.get("path") or entry.get("name")):
            problems.append(f"`{name}` entry {entry!r} needs `path` or `name`")
        for key, value in entry.items():
            if key in ("path", "name", "token") and not isinstance(value, str):
                problems.append(f"`{name}` entry {entry!r}: `{key}` must be text (got {value!r})")
            if key in ("weight", "te", "unet") and not (_is_number(value) and math.isfinite(value)):
                problems.append(f"`{name}` entry {entry!r}: `{key}` must be a finite number (got {value!r})")
    return problems


def _prompt_problems(check, *args) -> list[str]:
    """[the message] when `check(*args)` raises a `PromptError`, else []."""
    try:
        check(*args)
    except prompts.PromptError as error:
        return [str(error)]
    return []


def make_job(raw: dict, defaults: dict, where: str) -> Job:
    """A `Job` from a job-file entry over the command line's `defaults`; `where` names the entry in errors.

    Raises:
        JobError: Unknown keys (with the closest valid one), a setting given twice (under an alias), or what
            `Job` refuses: no prompt, wrong types, values out of range.
    """
    if not isinstance(raw, dict):
        raise JobError(f"{where}: a job is a mapping with at least `prompt`, got {type(raw).__name__}")
    values, given = dict(defaults), {}
    for key, value in raw.items():
        name = JOB_ALIASES.get(key, key)
        if name not in JOB_FIELDS:
            close = difflib.get_close_matches(str(key), list(JOB_FIELDS) + list(JOB_ALIASES), n=1)
            hint = f" Did you mean {JOB_ALIASES.get(close[0], close[0])!r}?" if close else ""
            raise JobError(f"{where}: unknown key {key!r}.{hint} Keys: {', '.join(JOB_FIELDS)}.")
        if name in given:
            raise JobError(f"{where}: {given[name]!r} and {key!r} both set `{name}`; keep one")
        values[name], given[name] = value, key
    values.setdefault("prompt", None)  # refused by Job as not text
    try:
        return Job(**values)
    except JobError as error:
        raise JobError(f"{where}: {error}") from None


def shorten(text: str, limit: int = 60) -> str:
    """`text`, cut to `limit` characters with "..." when longer (for naming a prompt or value in messages)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_jobs(path: Path, defaults: dict) -> list[Job]:
    """Jobs from a `.yaml`/`.yml` file (a list of mappings, or `{jobs: [...]}`), a `.jsonl` file (one mapping per
    line) or a `.txt` prompts file (one prompt per line; blank lines and `#` comments skipped).

    Raises:
        JobError: The file is missing, unreadable, not UTF-8, not valid YAML/JSON (with its line), or holds a job
            `make_job` refuses.
    """
    if path.suffix not in (".txt", ".jsonl", ".yaml", ".yml"):
        raise JobError(f"{path}: job files are .yaml, .jsonl or .txt (one prompt per line), not {path.suffix!r}")
    text = _read_text(path)
    if path.suffix == ".txt":
        lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)]
        return [make_job({"prompt": line}, defaults, f"{path}:{i}") for i, line in lines if line and line[0] != "#"]
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise JobError(f"{path}:{number}: not JSON ({error.msg}, column {error.colno})") from None
        return [make_job(entry, defaults, where) for where, entry in entries]
    return [make_job(entry, defaults, f"{path}: job {i}") for i, entry in enumerate(_yaml_jobs(path, text), 1)]


def _read_text(path: Path) -> str:
    """A job file's text (UTF-8; a byte-order mark, as Windows editors write, is skipped)."""
    if not path.is_file():
        raise JobError(f"{path}: no such job file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise JobError(f"{path}: cannot be read ({error.strerror}).") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise JobError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); save the file "
            "as UTF-8."
        ) from None


def _yaml_jobs(path: Path, text: str) -> list:
    """The job entries of a YAML job file, read with `yaml.safe_load` (plain data only: no tag runs code)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise JobError(yaml_problem(path, error, "`- prompt: a cat`")) from None
    if isinstance(data, dict) and set(data) == {"jobs"}:
        data = data["jobs"]
    if not isinstance(data, list):
        raise JobError(f"{path}: expected a list of jobs (or `jobs:` with a list and nothing else)")
    return data


def check_run_options(out: Path, batch_size: int, option: str = "--out") -> None:
    """Refuses, before any model loads, an output folder that cannot be made or written and a batch size below 1.

    Raises:
        JobError: `out` is a file or lies under one, is not writable, or `batch_size` < 1.
    """
    if not _is_whole(batch_size) or batch_size < 1:
        raise JobError(f"--batch-size {batch_size}: give 1 or more (images per forward pass)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JobError(
            f"{option} {out} is a file; images and {MANIFEST} go into a folder. Give a folder (new or existing)."
        )
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        raise JobError(f"{option} {out}: {existing} is a file, so no folder can be made inside it. Give a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise JobError(f"{option} {out}: no permission to write in {existing}. Give a folder you can write to.")
    if (out / MANIFEST).exists() and not (out / MANIFEST).is_file():
        raise JobError(f"{option} {out}: {out / MANIFEST} is a folder, so the manifest cannot be written.")


def write_jobs(path: Path, jobs: list[Job]) -> Path:
    """Writes jobs as a YAML job file (`--jobs FILE`) with every setting spelled out, so command-line defaults
    cannot change what it draws."""
    entries = [{k: v for k, v in asdict(job).items() if v or k not in ("loras", "embeddings")} for job in jobs]
    return atomic.write_text(path, yaml.safe_dump(entries, sort_keys=False, allow_unicode=True))


def generate_command(
    base, job_file: Path, embeddings=(), loras=(), batch_size: int = 1, base_config=None, prediction_type=None
) -> str:
    """The `sdtune generate` command line that runs `job_file` on `base` (read with the `base_config` folder and as
    predicting `prediction_type` when given) with `embeddings` ((file, token) pairs) and `loras` (files, at weight 1)
    loaded."""
    words = ["sdtune", "generate", "--base", str(base), "--jobs", str(job_file), "--batch-size", str(batch_size)]
    words += ["--base-config", str(base_config)] if base_config else []
    words += ["--prediction-type", prediction_type] if prediction_type else []
    for path, token in embeddings:
        words += ["--embedding", f"{path}:{token}"]
    for path in loras:
        words += ["--lora", str(path)]
    return shlex.join(words)


def split_spec(spec: str) -> tuple[str, list[str]]:
    """`"FILE_OR_NAME:0.8:1"` -> (`"FILE_OR_NAME"`, `["0.8", "1"]`). The longest prefix that is an existing file
    wins, so colons inside a path (`C:\\loras\\x.safetensors:0.5`) stay part of it."""
    parts = spec.split(":")
    for cut in range(len(parts), 0, -1):
        if Path(":".join(parts[:cut])).exists():
            return ":".join(parts[:cut]), parts[cut:]
    return parts[0], parts[1:]


@dataclass
class _Image:
    job: Job
    seed: int
    parsed: prompts.ParsedPrompt
    loras: dict[str, tuple[float, float]]  # prompt-tag and job LoRAs (the pipeline's active ones come on top)
    where: str = "job"  # the job it comes from, for messages


class BatchRunner:
    """Runs jobs on an `AdapterPipeline`, loading the LoRAs and embeddings that prompts and jobs name from an
    `AdapterLibrary` (or by path), and writes PNGs + `manifest.jsonl` into `out`."""

    def __init__(self, pipe: inference.AdapterPipeline, library: prompts.AdapterLibrary, out: Path, force=False):
        self.pipe, self.library, self.out, self.force = pipe, library, Path(out), force
        self.model_hash = base_model_sha256(pipe.base.source)[:10]

    def _ensure_lora(self, target: str) -> str:
        path = Path(target)
        name = path.stem if path.suffix == ".safetensors" and path.is_file() else target
        if name not in self.pipe.adapters:
            self.pipe.add_lora(
                path if path.is_file() else self.library.lora(name), name=name, active=False, force=self.force
            )
        return name

    def _ensure_embedding(self, target: str, token: str | None = None) -> str:
        path = Path(target)
        token = token or (path.stem if path.is_file() else target)
        if token not in self.pipe.adapters:
            self.pipe.add_embedding(
                path if path.is_file() else self.library.embedding(token), token=token, force=self.force
            )
        return token

    def _job_loras(self, job: Job, where: str) -> dict[str, tuple[float, float]]:
        loras = {}
        for entry in job.loras:
            if isinstance(entry, dict):
                target, weight = entry.get("path") or entry.get("name"), float(entry.get("weight", 1.0))
                pair = (float(entry.get("te", weight)), float(entry.get("unet", weight)))
            else:
                target, numbers = split_spec(str(entry))
                pair = prompts.lora_weights(target, numbers, f"{where}: lora {entry!r}")
            if not target:
                raise JobError(f"{where}: a lora entry needs `path` or `name` ({entry!r})")
            loras[self._ensure_lora(str(target))] = pair
        return loras

    def prepare(self, job: Job, where: str = "job") -> list[_Image]:
        """Loads what the job needs (tags, job adapters) and expands it into images with their seeds; warns (on
        stderr) when the text encoder will not read the whole prompt.

        Raises:
            JobError: A `clip_skip` the base model does not have (any on SDXL; more than its text encoder's layers).
        """
        self._check_clip_skip(job, where)
        for entry in job.embeddings:
            if isinstance(entry, dict):
                self._ensure_embedding(str(entry.get("path") or entry.get("name")), entry.get("token"))
            else:
                target, token = split_spec(str(entry))
                self._ensure_embedding(target, token[0] if token else None)
        loras = self._job_loras(job, where)
        known = {n for n, a in self.pipe.adapters.items() if a.kind == "embedding"} | set(self.library.embeddings)
        parsed = prompts.parse_prompt(job.prompt, sorted(known, key=len, reverse=True))
        for name in parsed.embeddings:
            self._ensure_embedding(name)
        for name, pair in parsed.loras.items():
            loras[self._ensure_lora(name)] = pair
        self._warn_if_cut(where, parsed.text, job.negative_prompt)
        seed = random.randrange(2**32) if job.seed in (None, RANDOM_SEED) else job.seed
        return [_Image(job, seed + i, parsed, loras, where) for i in range(job.n)]

    def _check_clip_skip(self, job: Job, where: str) -> None:
        family, most = self.pipe.base.family, self.pipe.max_clip_skip()
        if job.clip_skip > 1 and not family.clip_skip:
            raise JobError(
                f"{where}: clip_skip {job.clip_skip}, but {family.title} reads the penultimate layer of every text "
                "encoder by design, so clip_skip has no meaning for it; leave it at 1."
            )
        if job.clip_skip > most:
            raise JobError(
                f"{where}: clip_skip {job.clip_skip}, but this base's text encoder has {most} layers; give 1 to {most}"
            )

    def _warn_if_cut(self, where: str, text: str, negative: str) -> None:
        """The pipeline reads the first 75 tokens of a prompt and drops the rest without a word; say so."""
        for name, words in (("prompt", text), ("negative prompt", negative)):
            count, limit = self.pipe.token_count(words)
            if count > limit:
                print(
                    f"warning: {where}: the {name} is {count} tokens (embeddings expanded, tags taken out); the text "
                    f"encoder reads the first {limit} and ignores the rest. Shorten it to keep what matters.",
                    file=sys.stderr,
                )

    def run(self, jobs: list[Job], batch_size: int = 1, grid: bool = False, progress: bool = True) -> list[Path]:
        """Generates every image of every job; returns the PNG paths (plus `grid.png` last when `grid`).

        Raises:
            JobError: The output folder cannot be written, or a job cannot be prepared (before generating).
            NonFiniteImageError: An image decoded to NaN or infinite pixels: the run stops there, the images before
                it (and the good ones of its batch) are saved, it is not.
        """
        check_run_options(self.out, batch_size)
        items = [image for number, job in enumerate(jobs, 1) for image in self.prepare(job, f"job {number}")]
        index = self._next_index()
        written, images = [], []
        bar = tqdm(total=len(items), desc="generating", unit="img", disable=not progress)
        for batch in _batches(items, batch_size):
            try:
                drawn = list(zip(batch, self._generate(batch), strict=True))
            except inference.NonFiniteImageError as error:
                kept = [(item, image) for item, image in zip(batch, error.images, strict=True) if image is not None]
                written += [self._save(item, image, index + i) for i, (item, image) in enumerate(kept)]
                bar.close()
                raise _non_finite_error(batch, error.images, len(written)) from None
            for item, image in drawn:
                written.append(self._save(item, image, index))
                images.append(image)
                index += 1
            bar.update(len(batch))
        bar.close()
        if grid and images:
            columns = math.ceil(math.sqrt(len(images)))
            written.append(inference.save_png(inference.image_grid(images, columns), self.out / "grid.png"))
        return written

    def _generate(self, batch: list[_Image]):
        job = batch[0].job
        if self.pipe.sampler != job.sampler:
            self.pipe.set_sampler(job.sampler)
        return self.pipe.generate(
            [item.parsed.text for item in batch],
            [item.seed for item in batch],
            negative_prompt=job.negative_prompt,
            steps=job.steps,
            guidance=job.guidance,
            width=job.width,
            height=job.height,
            extra_loras=batch[0].loras,
            clip_skip=job.clip_skip,
        )

    def _next_index(self) -> int:
        numbers = [int(p.name[:5]) for p in self.out.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
        return max(numbers, default=-1) + 1

    def applied_loras(self, item: _Image) -> dict[str, tuple[float, float]]:
        """The LoRAs an image was made with: the pipeline's active ones, then the job's and the prompt's."""
        active = {n: (a.text_encoder_weight, a.unet_weight) for n, a in self.pipe.adapters.items() if a.active}
        return {**{n: w for n, w in active.items() if self.pipe.adapters[n].kind == "lora"}, **item.loras}

    def _save(self, item: _Image, image, index: int) -> Path:
        path = self.out / f"{index:05d}-{item.seed}.png"
        inference.save_png(image, path, {"parameters": self.infotext(item, image.size)})
        record = self.manifest_entry(item, path, image.size)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / MANIFEST, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        return path

    def manifest_entry(self, item: _Image, path: Path, size: tuple[int, int]) -> dict:
        """One `manifest.jsonl` line: the file, every setting and every adapter with its weights and hash."""
        job = {k: v for k, v in asdict(item.job).items() if k not in ("n", "seed", "loras", "embeddings")}
        loras = [
            {"name": n, "path": str(self.pipe.adapters[n].path), "hash": self.pipe.adapters[n].short_hash,
             "text_encoder_weight": te, "unet_weight": unet}
            for n, (te, unet) in self.applied_loras(item).items()
        ]  # fmt: skip
        embeddings = [
            {"name": n, "path": str(self.pipe.adapters[n].path), "hash": self.pipe.adapters[n].short_hash}
            for n in item.parsed.embeddings
        ]
        return {
            "file": path.name, **job, "seed": item.seed, "text": item.parsed.text, "width": size[0], "height": size[1],
            "model": self.pipe.base.name, "model_hash": self.model_hash, "loras": loras, "embeddings": embeddings,
        }  # fmt: skip

    def infotext(self, item: _Image, size: tuple[int, int]) -> str:
        """A1111's `parameters` text; LoRAs not written as tags in the prompt are appended as tags, so pasting it
        into A1111 applies the same stack."""
        loras = self.applied_loras(item)
        tags = [_tag(n, w) for n, w in loras.items() if n not in item.parsed.loras]
        lines = [" ".join([item.job.prompt, *tags])]
        if item.job.negative_prompt:
            lines.append(f"Negative prompt: {item.job.negative_prompt}")
        settings = {
            "Steps": item.job.steps,
            "Sampler": inference.SAMPLERS[item.job.sampler][2],
            "CFG scale": f"{item.job.guidance:g}",
            "Seed": item.seed,
            "Size": f"{size[0]}x{size[1]}",
            "Model hash": self.model_hash,
            "Model": self.pipe.base.name,
        }
        if item.job.clip_skip > 1:
            settings["Clip skip"] = item.job.clip_skip
        if loras:
            settings["Lora hashes"] = _quoted(f"{n}: {self.pipe.adapters[n].short_hash}" for n in loras)
        if item.parsed.embeddings:
            settings["TI hashes"] = _quoted(f"{n}: {self.pipe.adapters[n].short_hash}" for n in item.parsed.embeddings)
        settings["Version"] = f"sdtune {__version__}"
        lines.append(", ".join(f"{key}: {value}" for key, value in settings.items()))
        return "\n".join(lines)


def report_warnings(adapter: inference.Adapter) -> None:
    """Prints what `force` let through, so a command-line user sees it before the images."""
    for warning in adapter.warnings:
        print(f"warning: {adapter.path} loaded with force although it {warning}", file=sys.stderr)


def _non_finite_error(batch: list[_Image], images: list, saved: int) -> inference.NonFiniteImageError:
    """The error for the images of `batch` that came back as None, naming their jobs, prompts and seeds."""
    labels = [
        f"{item.where} (prompt {shorten(item.job.prompt)!r}, seed {item.seed})"
        for item, image in zip(batch, images, strict=True)
        if image is None
    ]
    note = f" The run stopped there; {saved} image(s) of it were saved (PNG and manifest line)."
    return inference.NonFiniteImageError(labels, images, note)


def _tag(name: str, weights: tuple[float, float]) -> str:
    te, unet = weights
    return f"<lora:{name}:{te:g}>" if te == unet else f"<lora:{name}:{te:g}:{unet:g}>"


def _quoted(parts) -> str:
    """A1111 quotes an infotext value that contains commas or colons (as JSON)."""
    return json.dumps(", ".join(parts))


def _batches(items: list[_Image], batch_size: int):
    """Consecutive images that share every setting, at most `batch_size` at a time."""
    batch: list[_Image] = []
    for item in items:
        key = _settings_key(item)
        if batch and (len(batch) == batch_size or _settings_key(batch[0]) != key):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _settings_key(item: _Image) -> tuple:
    job = item.job
    return (
        job.negative_prompt,
        job.steps,
        job.guidance,
        job.width,
        job.height,
        job.sampler,
        sorted(item.loras.items()),
    )
