"""The one way sdtune writes a file or folder: under a temporary name beside it, then renamed into place.

A reader (a client loading a LoRA, `resume: latest`, a later run reading a cache) never sees half a file: it sees the
old one or the new one. Temporary names carry the process id (`.<name>.tmp<pid>`), so processes writing into the same
folder never share one; a failed write removes its temporary file or folder. With `durable=True` the data and the
rename are flushed to disk (fsync) before the call returns, for what a crash must not lose (trained outputs, training
states, captions); caches and previews skip it. New files get the permissions the user's umask gives.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it sets it: done once, at import, before training starts threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _temporary(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}{os.getpid()}")


def _fsync_file(path: Path) -> None:
    """Flushes a file's data to disk (opened for writing: Windows flushes only such handles)."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_folder(path: Path) -> None:
    """Flushes a folder's entries (a rename) to disk; POSIX only (Windows neither needs nor allows it)."""
    if os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path to write; when the block ends without an error it becomes `path`.

    Args:
        path: The file to (re)place. Its folder is created when missing.
        durable: fsync the data and the folder, so the file survives a crash right after the call.

    Example:
        >>> with atomic_file(Path("out/lora.safetensors"), durable=True) as temporary:
        ...     save_file(tensors, str(temporary))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path, "tmp")
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_UMASK)  # some writers (safetensors) create files readable by the owner only
        if durable:
            _fsync_file(temporary)
        os.replace(temporary, path)
        if durable:
            _fsync_folder(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder to fill; when the block ends without an error it becomes `path`, replacing
    any folder there (the old one is renamed aside first, so `path` always holds a complete folder).

    Args:
        path: The folder to (re)place. Its parent is created when missing.
        durable: fsync every file written and the parent folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging, old = _temporary(path, "tmp"), _temporary(path, "old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if durable:
            for file in (p for p in staging.rglob("*") if p.is_file()):
                _fsync_file(file)
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
        if durable:
            _fsync_folder(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    """Writes UTF-8 text atomically (see `atomic_file`)."""
    with atomic_file(path, durable) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, blob: bytes, durable: bool = False) -> Path:
    """Writes bytes atomically (see `atomic_file`)."""
    with atomic_file(path, durable) as temporary:
        temporary.write_bytes(blob)
    return Path(path)
