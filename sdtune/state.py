"""Resumable training state: trainable weights, optimizer, LR schedule, RNG states and the position in the data.

A state is a folder `<output_dir>/state/step-00000040/` written under a temporary name and renamed when complete
(`sdtune.atomic`), so a crash mid-save never leaves a broken state and `latest` is always the newest complete one.
Only tensors and plain data are stored (safetensors, JSON, and `torch.load(weights_only=True)`-loadable
optimizer/schedule dicts). A state can only be resumed by the settings that wrote it (`config_digest`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdtune import atomic
from sdtune.config import TrainConfig, to_dict
from sdtune.errors import SdtuneError
from sdtune.models import file_sha256

STATE_DIR = "state"
MANIFEST = "manifest.json"  # written last: names, sizes and SHA-256 of the state's other files
_PREFIX = "step-"
# Settings a resumed run may change: where and how often outputs, samples and logs are written, data loading, and
# the run's length (a longer schedule is stated when the run resumes).
_RESUMABLE_CHANGES = {
    "resume",
    "overwrite",
    "keep_last_n",
    "save_state",
    "save_steps",
    "output_dir",
    "logging_dir",
    "log_with",
    "log_tracker_name",
    "dataloader_num_workers",
    "max_steps",
    "epochs",
}
_LENGTH = ("max_steps", "epochs")  # states written before they became resumable changes hashed them
logger = logging.getLogger(__name__)


class StateError(SdtuneError):
    """A state that cannot be resumed from (missing, damaged, or made by other settings or data)."""


def resumable_settings(config: TrainConfig, processes: int = 1) -> dict:
    """The settings a resume must match: every resolved setting except where and how often outputs are written and
    the run's length, plus the number of processes (it sets the global batch), as plain JSON values."""
    settings = {
        k: v for k, v in to_dict(config).items() if k not in _RESUMABLE_CHANGES and not k.startswith("sample_")
    }
    if processes > 1:  # one-process digests stay what they were
        settings["num_processes"] = processes
    return json.loads(json.dumps(settings, default=str))


def config_digest(config: TrainConfig, processes: int = 1) -> str:
    """SHA-256 of `resumable_settings`: what a state must match to be resumed."""
    return _digest(resumable_settings(config, processes))


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def accepted_digests(config: TrainConfig, processes: int = 1) -> tuple[str, str]:
    """The digests a state resumable by this config may carry: today's, and the one states saved before run length
    became a resumable change carried (length included)."""
    settings = resumable_settings(config, processes)
    legacy = {**settings, **{key: getattr(config, key) for key in _LENGTH}}
    return _digest(settings), _digest(legacy)


def dataset_fingerprint(examples: list) -> dict[str, list]:
    """What a resume checks the data against: per image (each once) its size in bytes, modification time (ns) and
    a hash of its caption."""
    fingerprint = {}
    for example in examples:
        stat = example.image_path.stat()
        caption = hashlib.sha1((example.caption or "").encode()).hexdigest()[:16] if example.caption else None
        fingerprint[str(example.image_path)] = [stat.st_size, stat.st_mtime_ns, caption]
    return fingerprint


@dataclass
class RunIdentity:
    """What a state records about the run that wrote it: the run's id (its output folder's owner), the settings a
    resume must match, and the data's fingerprint."""

    run_id: str
    settings: dict
    dataset: dict[str, list]

    @property
    def digest(self) -> str:
        return _digest(self.settings)


@dataclass
class Position:
    """Where training stands: optimizer steps done, the epoch, and batches of that epoch already used."""

    step: int
    epoch: int
    batch: int


def _rng_states() -> dict:
    numpy_state = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        states["cuda"] = [state.tolist() for state in torch.cuda.get_rng_state_all()]
    return states


def _restore_rng(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


def save_state(output_dir: Path, position: Position, trainables: dict, optimizer, schedule, identity: RunIdentity,
               keep_last_n: int | None = None, scaler=None, total_steps: int | None = None) -> Path:  # fmt: skip
    """Writes a complete state folder atomically (its manifest last) and removes all but the newest `keep_last_n`
    states of this run (`scaler`: fp16's gradient scaler, whose loss scale must survive a resume; `total_steps`:
    the run's planned length, stated when a resume changes it).

    Raises:
        atomic.DiskFull: The disk filled up; nothing of this state is left and older states are untouched.
    """
    final = Path(output_dir) / STATE_DIR / f"{_PREFIX}{position.step:08d}"
    tensors = {
        f"{group}.{i}": p.detach().cpu().contiguous() for group, ps in trainables.items() for i, p in enumerate(ps)
    }
    saved = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
    if scaler is not None:
        saved["scaler"] = scaler.state_dict()
    meta = {
        "position": vars(position), "rng": _rng_states(), "config_digest": identity.digest,
        "run_id": identity.run_id, "settings": identity.settings, "dataset": identity.dataset,
        "total_steps": total_steps,
    }  # fmt: skip
    with atomic.atomic_dir(final, durable=True, expected_bytes=estimated_size(trainables)) as staging:
        save_file(tensors, str(staging / "trainable.safetensors"))
        torch.save(saved, staging / "optimizer.pt")
        (staging / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        _write_manifest(staging)
    ours = [path for path in list_states(output_dir) if _run_id(path) in (identity.run_id, None)]
    for old in ours[:-keep_last_n] if keep_last_n else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def estimated_size(trainables: dict) -> int:
    """Bytes a state of these trainable parameters takes: the float32 weights and Adam's two moments."""
    return sum(param.numel() for params in trainables.values() for param in params) * 4 * 3


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def damage(path: Path) -> str | None:
    """Why the state folder `path` cannot be used (a file missing, truncated or changed since it was saved), or
    None when every file matches its manifest. States saved before manifests existed are checked for their files."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        missing = [
            name for name in ("state.json", "trainable.safetensors", "optimizer.pt") if not (path / name).is_file()
        ]
        if missing:
            return f"{', '.join(missing)} missing"
        try:  # no manifest to check it against: at least it must read
            json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return "state.json is damaged"
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"{MANIFEST} is damaged"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} is {file.stat().st_size} bytes, {expected['bytes']} when saved (truncated or changed)"
        if file_sha256(file) != expected["sha256"]:
            return f"{name} changed since it was saved (SHA-256 differs)"
    return None


def _run_id(path: Path) -> str | None:
    """The id of the run that wrote a state (None: an unreadable state, or one from before run ids)."""
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def list_states(output_dir: Path) -> list[Path]:
    """State folders (saved completely once: a state.json or manifest), oldest first; see `damage` for whether
    their files are still intact."""
    root = Path(output_dir) / STATE_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(rf"{_PREFIX}\d+", p.name) and p.is_dir()]
    return sorted(p for p in found if (p / "state.json").is_file() or (p / MANIFEST).is_file())


def resolve(resume: str, output_dir: Path) -> Path:
    """The state folder `resume` names: `latest` (the newest intact one under output_dir, with a warning naming
    each damaged newer one passed over) or a path.

    Raises:
        StateError: Nothing to resume from, or the named state is damaged.
    """
    if resume == "latest":
        states = list_states(output_dir)
        if not states:
            raise StateError(f"resume: latest, but {Path(output_dir) / STATE_DIR} holds no saved state yet.")
        damaged = []
        for path in reversed(states):
            problem = damage(path)
            if problem is None:
                for bad, why in damaged:
                    logger.warning("resume: latest skips %s (%s) and uses %s", bad, why, path)
                return path
            damaged.append((path, problem))
        listing = "; ".join(f"{path.name}: {why}" for path, why in damaged)
        raise StateError(f"resume: latest, but every state in {Path(output_dir) / STATE_DIR} is damaged ({listing}).")
    path = Path(resume)
    if not (path / "state.json").is_file() and not (path / MANIFEST).is_file():
        raise StateError(f"resume: {path} is not a saved state folder (no state.json); use resume: latest.")
    problem = damage(path)
    if problem:
        intact = [p for p in list_states(path.parent.parent) if damage(p) is None]
        fix = f"resume from {intact[-1]} (the newest intact state)" if intact else "start a new run"
        raise StateError(f"resume: {path} is damaged: {problem}; {fix}.")
    return path


def read_meta(path: Path) -> dict:
    """A state's `state.json` (position, run id, settings, data fingerprint)."""
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def load_state(path: Path, trainables: dict, optimizer, schedule, digests: Collection[str], scaler=None) -> Position:
    """Restores weights, optimizer, schedule, gradient scaler (fp16) and RNG states from a state folder; returns
    where to continue (`digests`: see `accepted_digests`; `preflight` names the differing settings first).

    Raises:
        StateError: The state was written by a run with other training settings.
    """
    meta = read_meta(path)
    if meta["config_digest"] not in digests:
        raise StateError(
            f"resume: {path} was saved by a run with other training settings (method, data, batch, "
            "optimizer, number of processes...); resume with the config and launch that wrote it, or start a new "
            "output_dir."
        )
    tensors = load_file(str(path / "trainable.safetensors"))
    with torch.no_grad():
        for group, params in trainables.items():
            for i, param in enumerate(params):
                param.copy_(tensors[f"{group}.{i}"])
    saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    if scaler is not None and "scaler" in saved:
        scaler.load_state_dict(saved["scaler"])
    _restore_rng(meta["rng"])
    return Position(**meta["position"])


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def settings_changes(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every resume-relevant setting that differs."""
    keys = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    return [f"{key}: {_shown(saved.get(key))} -> {_shown(current.get(key))}" for key in keys]


def dataset_changes(saved: dict[str, list], current: dict[str, list]) -> tuple[list[str], list[str]]:
    """(changes that make a resume a different run, changes that do not) between two `dataset_fingerprint`s:
    images added, removed, resized or recaptioned; images only touched (same size, new modification time)."""

    def names(paths) -> str:
        paths = sorted(Path(path).name for path in paths)
        return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")

    changes = {
        "image(s) removed": saved.keys() - current.keys(),
        "image(s) added": current.keys() - saved.keys(),
        "image(s) with a new file size": {p for p in saved.keys() & current.keys() if saved[p][0] != current[p][0]},
        "caption(s) changed": {p for p in saved.keys() & current.keys() if saved[p][2] != current[p][2]},
    }
    refusals = [f"{len(paths)} {what} ({names(paths)})" for what, paths in changes.items() if paths]
    touched = {
        p for p in saved.keys() & current.keys() if saved[p][1] != current[p][1] and saved[p][0] == current[p][0]
    }
    notes = [f"{len(touched)} image(s) have a new modification time but the same size ({names(touched)})"]
    return refusals, notes if touched else []
