"""Resumable training state: trainable weights, optimizer, LR schedule, RNG states and the position in the data.

A state is a folder `<output_dir>/state/step-00000040/` written under a temporary name and renamed when complete
(`sdtune.atomic`), so a crash mid-save never leaves a broken state and `latest` is always the newest complete one.
Only tensors and plain data are stored (safetensors, JSON, and `torch.load(weights_only=True)`-loadable
optimizer/schedule dicts). A state can only be resumed by the settings that wrote it (`config_digest`).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdtune import atomic
from sdtune.config import TrainConfig, to_dict
from sdtune.errors import SdtuneError

STATE_DIR = "state"
_PREFIX = "step-"
# Settings a resumed run may change: where and how often outputs, samples and logs are written, and data loading.
_RESUMABLE_CHANGES = {
    "resume",
    "keep_last_n",
    "save_state",
    "save_steps",
    "output_dir",
    "logging_dir",
    "log_with",
    "log_tracker_name",
    "dataloader_num_workers",
}


class StateError(SdtuneError):
    """A state that cannot be resumed from (missing, or made by another config)."""


def config_digest(config: TrainConfig, processes: int = 1) -> str:
    """What a state must match to be resumed: every resolved setting except where and how often outputs are written,
    and the number of processes (it sets the global batch)."""
    settings = {
        k: v for k, v in to_dict(config).items() if k not in _RESUMABLE_CHANGES and not k.startswith("sample_")
    }
    if processes > 1:  # one-process digests stay what they were
        settings["num_processes"] = processes
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


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


def save_state(output_dir: Path, position: Position, trainables: dict, optimizer, schedule, digest: str,
               keep_last_n: int | None = None, scaler=None) -> Path:  # fmt: skip
    """Writes a complete state folder atomically and removes all but the newest `keep_last_n` states (`scaler`:
    fp16's gradient scaler, whose loss scale must survive a resume)."""
    final = Path(output_dir) / STATE_DIR / f"{_PREFIX}{position.step:08d}"
    tensors = {
        f"{group}.{i}": p.detach().cpu().contiguous() for group, ps in trainables.items() for i, p in enumerate(ps)
    }
    saved = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
    if scaler is not None:
        saved["scaler"] = scaler.state_dict()
    meta = {"position": vars(position), "rng": _rng_states(), "config_digest": digest}
    with atomic.atomic_dir(final, durable=True) as staging:
        save_file(tensors, str(staging / "trainable.safetensors"))
        torch.save(saved, staging / "optimizer.pt")
        (staging / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    for old in list_states(output_dir)[:-keep_last_n] if keep_last_n else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_states(output_dir: Path) -> list[Path]:
    """Complete state folders, oldest first."""
    root = Path(output_dir) / STATE_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").is_file())


def resolve(resume: str, output_dir: Path) -> Path:
    """The state folder `resume` names: `latest` (the newest under output_dir) or a path.

    Raises:
        StateError: Nothing to resume from.
    """
    if resume == "latest":
        states = list_states(output_dir)
        if not states:
            raise StateError(f"resume: latest, but {Path(output_dir) / STATE_DIR} holds no saved state yet.")
        return states[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise StateError(f"resume: {path} is not a saved state folder (no state.json); use resume: latest.")
    return path


def load_state(path: Path, trainables: dict, optimizer, schedule, digest: str, scaler=None) -> Position:
    """Restores weights, optimizer, schedule, gradient scaler (fp16) and RNG states from a state folder; returns
    where to continue.

    Raises:
        StateError: The state was written by a run with other training settings.
    """
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if meta["config_digest"] != digest:
        raise StateError(
            f"resume: {path} was saved by a run with other training settings (method, data, batch, steps, "
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
