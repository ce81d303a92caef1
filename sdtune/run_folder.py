"""A training run's output folder: which run owns it (`sdtune-run.json`), which process writes into it now (the
lock), what a killed process left behind, and whether the disk has room for what the run will write.

One run owns an `output_dir`. A new run refuses a folder holding another run's outputs unless it continues that run
(`resume`) or replaces it (`overwrite: true`, which deletes what sdtune wrote there and nothing else). While a run
trains, `.sdtune.lock` names its process (pid, host, start time); a second run into the same folder is refused with
that pid, and a lock whose process is gone (killed, machine rebooted) is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
from safetensors import safe_open

from sdtune import atomic, state
from sdtune._version import __version__
from sdtune.config import ConfigError, TrainConfig
from sdtune.errors import SdtuneError

RECORD = "sdtune-run.json"
LOCK = ".sdtune.lock"
SAMPLES = "samples"
_TEMPORARY = re.compile(r"\..+\.(tmp|old)(\d+)")  # `atomic`'s temporary names: .<name>.tmp<pid> / .<name>.old<pid>
_MB = 1 << 20
logger = logging.getLogger(__name__)


class OutputInUse(SdtuneError):
    """Another training process writes into the same output folder."""


# ---------------------------------------------------------------------------------------------------------------
# Ownership


def read_record(folder: Path) -> dict | None:
    """The run record of an output folder (None: no record, or one that cannot be read)."""
    try:
        return json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _carries_sdtune_metadata(path: Path) -> bool:
    """Whether a .safetensors file is an sdtune output (its header holds `sdtune.*` keys)."""
    try:
        with safe_open(str(path), "pt") as handle:
            return any(key.startswith("sdtune.") for key in (handle.metadata() or {}))
    except Exception:  # not a safetensors file at all: not ours
        return False


def previous_outputs(config: TrainConfig) -> list[Path]:
    """What earlier sdtune runs wrote into `output_dir`: the files their run record lists, training states, sample
    grids and their job file, and (for folders from before run records) sdtune-made .safetensors files and this
    config's diffusers LoRA folder. Nothing else in the folder is counted (or ever deleted)."""
    folder = Path(config.output_dir)
    if not folder.is_dir():
        return []
    record = read_record(folder) or {}
    found = [folder / name for name in record.get("outputs", []) if (folder / name).exists()]
    found += [path for path in (folder / state.STATE_DIR).glob("step-*") if path.is_dir()]
    samples = folder / SAMPLES
    found += sorted(samples.glob("step*.png")) + [p for p in (samples / "progress.png",) if p.is_file()]
    found += [p for p in (folder / "sample_prompts.yaml",) if p.is_file()]
    found += [p for p in sorted(folder.glob("*.safetensors")) if _carries_sdtune_metadata(p)]
    diffusers_folder = folder / f"{config.output_name}_diffusers"
    found += [diffusers_folder] if diffusers_folder.is_dir() else []
    return list(dict.fromkeys(found))


def ownership_problems(config: TrainConfig, resumed_run: str | None = None) -> list[str]:
    """Why this run may not write into `output_dir` (checked before anything loads).

    Args:
        config: The resolved config.
        resumed_run: With `resume`: the run id recorded in the state being resumed (None: a state without one).
    """
    folder = Path(config.output_dir)
    record = read_record(folder)
    if config.resume:
        owner = record and record.get("run_id")
        if owner and resumed_run and owner != resumed_run:
            return [
                f"resume: the state belongs to run {resumed_run}, but output_dir {folder} holds run {owner}'s "
                "outputs; resume into that run's own output_dir, or choose a new output_dir."
            ]
        return []
    found = previous_outputs(config)
    if not found or config.overwrite:
        return []
    shown = ", ".join(str(path.relative_to(folder)) for path in found[:4])
    more = f" and {len(found) - 4} more" if len(found) > 4 else ""
    return [
        f"output_dir: {folder} holds another run's outputs ({shown}{more}); continue that run with resume: latest, "
        "replace it with overwrite: true (deletes those files, nothing else), or choose a new output_dir."
    ]


def _remove_previous_outputs(config: TrainConfig) -> None:
    """`overwrite: true`: deletes what earlier runs wrote (see `previous_outputs`), nothing else; never a file this
    run reads (a LoRA to continue, a VAE)."""
    inputs = {Path(p).resolve() for p in (config.network_weights, config.vae, config.base_model) if p}
    for path in previous_outputs(config):
        if path.resolve() in inputs:
            continue
        logger.warning("overwrite: true: deleting %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _write_record(folder: Path, run_id: str, outputs: list[str]) -> None:
    record = {
        "run_id": run_id, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
        "pid": os.getpid(), "sdtune_version": __version__, "outputs": outputs,
    }  # fmt: skip
    atomic.write_text(folder / RECORD, json.dumps(record, indent=1), durable=True)


def note_outputs(folder: Path, paths: list[Path]) -> None:
    """Adds written files to the run record, so a later `overwrite: true` knows they are this run's."""
    record = read_record(folder)
    if record is None:
        return
    names = [str(Path(path).relative_to(folder)) for path in paths]
    record["outputs"] = list(dict.fromkeys([*record.get("outputs", []), *names]))
    atomic.write_text(Path(folder) / RECORD, json.dumps(record, indent=1), durable=True)


# ---------------------------------------------------------------------------------------------------------------
# The lock


@dataclass
class Claim:
    """A held output folder: the run's id and the lock to release when the run ends."""

    run_id: str
    lock: Path | None

    def release(self) -> None:
        """Removes the lock (once; later calls do nothing)."""
        if self.lock is not None:
            self.lock.unlink(missing_ok=True)
            self.lock = None


def _this_process() -> dict:
    return {
        "pid": os.getpid(), "host": socket.gethostname(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "process_started": psutil.Process().create_time(),
    }  # fmt: skip


def _holder_alive(holder: dict) -> bool:
    """Whether the process a lock names still runs (a pid reused by another process counts as gone). A lock from
    another host cannot be checked: it counts as alive."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        process = psutil.Process(int(holder["pid"]))
        started = holder.get("process_started")
        return started is None or abs(process.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return False


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        # being written this very moment, or left half-written by a crash: young means a process is starting
        return {} if time.time() - path.stat().st_mtime < 10 else {"pid": None, "host": socket.gethostname()}


def _acquire(folder: Path) -> Path:
    """Creates the lock file (exclusively), taking over a stale one.

    Raises:
        OutputInUse: A live process holds it.
    """
    path = folder / LOCK
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                continue  # released meanwhile
            if _holder_alive(holder):
                raise OutputInUse(_in_use_message(folder, path, holder)) from None
            logger.warning("%s: taking over the lock of pid %s, which no longer runs", folder, holder.get("pid"))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(_this_process(), handle)
        return path
    raise OutputInUse(f"output_dir: {folder}: could not take {path} (other processes keep taking it); try again.")


def lock_problem(folder: Path) -> str | None:
    """Why `folder` cannot be trained into now: a live process holds its lock (None: free, or a stale lock)."""
    path = Path(folder) / LOCK
    holder = _read_lock(path) if path.is_file() else None
    return None if holder is None or not _holder_alive(holder) else _in_use_message(Path(folder), path, holder)


def _in_use_message(folder: Path, path: Path, holder: dict) -> str:
    if not holder:
        return f"output_dir: {folder} is being claimed by another sdtune process right now ({path}); try again."
    return (
        f"output_dir: {folder} is in use by another training (pid {holder.get('pid')} on {holder.get('host')}, "
        f"started {holder.get('started_at')}); wait for it to end or choose another output_dir. If that process is "
        f"gone (another machine that crashed), delete {path}."
    )


def _remove_stale_temporaries(folder: Path) -> None:
    """Deletes the temporary files and folders of writes a killed process left (under the lock, no other process
    writes here)."""
    for where in (folder, folder / state.STATE_DIR, folder / SAMPLES):
        for path in where.glob(".*") if where.is_dir() else ():
            match = _TEMPORARY.fullmatch(path.name)
            if match and int(match.group(2)) != os.getpid():
                logger.warning("removing %s, left by an interrupted write", path)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)


def resumed_run_id(config: TrainConfig) -> str | None:
    """The run id recorded in the state `resume` names (None: no resume, or a state from before run ids)."""
    if not config.resume:
        return None
    return state.read_meta(state.resolve(config.resume, Path(config.output_dir))).get("run_id")


def claim_output_folder(config: TrainConfig) -> Claim:
    """Takes `output_dir` for this run: the lock, stale temporaries removed, with `overwrite: true` the earlier
    run's outputs deleted, and the run record written (a resumed run keeps the id its state records).

    Raises:
        OutputInUse: Another training process holds the folder.
        ConfigError: The folder holds another run's outputs (checked again under the lock).
    """
    folder, resumed_run = Path(config.output_dir), resumed_run_id(config)
    folder.mkdir(parents=True, exist_ok=True)
    lock = _acquire(folder)
    try:
        problems = ownership_problems(config, resumed_run)
        if problems:
            raise ConfigError(problems, "output_dir")
        _remove_stale_temporaries(folder)
        record = read_record(folder) if config.resume else None
        if config.overwrite:
            _remove_previous_outputs(config)
        run_id = resumed_run or (record or {}).get("run_id") or uuid.uuid4().hex
        _write_record(folder, run_id, (record or {}).get("outputs", []))
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    return Claim(run_id, lock)


# ---------------------------------------------------------------------------------------------------------------
# Space


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk `folder` is (or will be) on."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def space_needed(config: TrainConfig, groups: dict, total_steps: int) -> tuple[int, str]:
    """(bytes, how they add up) a run writes into output_dir: every save of the trained files (`groups`: the
    trainable parameters by group) and the training states kept at once (one more while the newest is written)."""
    embedding = sum(p.numel() for p in groups.get("embedding", [])) * 4
    adapters = sum(p.numel() for name, params in groups.items() if name != "embedding" for p in params)
    one_save = embedding + adapters * (4 if config.save_precision == "fp32" else 2)
    saves = 1 + ((total_steps - 1) // config.save_steps if config.save_steps else 0)
    states = min(config.keep_last_n or saves, saves) + 1 if config.save_state else 0
    state_bytes = state.estimated_size(groups)
    what = f"{saves} save(s) of {one_save / _MB:.1f} MB, {states} state(s) of {state_bytes / _MB:.1f} MB"
    return one_save * saves + state_bytes * states, what


def space_problem(folder: Path, needed: int, what: str) -> str | None:
    """A message when the disk under `folder` has less room than `needed` bytes (`what`: how that adds up)."""
    free = free_bytes(folder)
    if free >= needed:
        return None
    return (
        f"output_dir: {folder} has {free / _MB:.0f} MB free, but this run writes about {needed / _MB:.0f} MB "
        f"({what}); free some space, save less often (save_steps), keep fewer states (keep_last_n), or choose "
        "another output_dir."
    )
