"""The one way sdtune writes a file or folder: under a temporary name beside it, then renamed into place.

A reader (a client loading a LoRA, `resume: latest`, a later run reading a cache) never sees half a file: it sees the
old one or the new one. Temporary names carry the process id (`.<name>.tmp<pid>`), so processes writing into the same
folder never share one; a failed write removes its temporary file or folder. With `durable=True` the data and the
rename are flushed to disk (fsync) before the call returns, for what a crash must not lose (trained outputs, training
states, captions); caches and previews skip it. New files get the permissions the user's umask gives.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdtune.errors import SdtuneError

_MB = 1 << 20
# How writers say the disk is full: the OS (ENOSPC, EDQUOT), safetensors' Rust writer, torch's zip writer (a short
# write surfaces as "unexpected pos")
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_MESSAGES = ("No space left", "StorageFull", "Disk quota exceeded", "unexpected pos")


class DiskFull(SdtuneError):
    """A write failed because the disk (or quota) is full; its temporary file was removed."""

    exit_code = 1

    def __init__(self, path: Path, expected_bytes: int | None, free: int):
        needs = f"needs ~{max(1, round(expected_bytes / _MB))} MB, " if expected_bytes else ""
        super().__init__(
            f"disk full at {path} ({needs}{free / _MB:.0f} MB free): nothing of it was kept and the files written "
            "before are untouched. Free some space (or choose another folder) and run again; a training continues "
            "with resume=latest."
        )


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it sets it: done once, at import, before training starts threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _temporary(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}{os.getpid()}")


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for lack of space: the error (or one it came from) says so, or the disk has
    less than 1 MB left right after the failure (torch and safetensors do not always keep the errno)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if any(text in str(seen) for text in _FULL_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    return _free_bytes(folder) < _MB


@contextmanager
def _disk_full_reported(path: Path, expected_bytes: int | None) -> Iterator[None]:
    """Turns a failed write into `DiskFull` when the disk filled up (measured before the temporary is removed)."""
    try:
        yield
    except Exception as error:
        if _is_disk_full(error, path.parent):
            raise DiskFull(path, expected_bytes, _free_bytes(path.parent)) from error
        raise


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
def atomic_file(path: str | os.PathLike, durable: bool = False, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yields a temporary path to write; when the block ends without an error it becomes `path`.

    Args:
        path: The file to (re)place. Its folder is created when missing.
        durable: fsync the data and the folder, so the file survives a crash right after the call.
        expected_bytes: About how large the file is, for the message when the disk fills up.

    Raises:
        DiskFull: The disk filled up while writing (the temporary file is removed).

    Example:
        >>> with atomic_file(Path("out/lora.safetensors"), durable=True) as temporary:
        ...     save_file(tensors, str(temporary))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path, "tmp")
    try:
        with _disk_full_reported(path, expected_bytes):
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
def atomic_dir(path: str | os.PathLike, durable: bool = False, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yields an empty temporary folder to fill; when the block ends without an error it becomes `path`, replacing
    any folder there (the old one is renamed aside first, so `path` always holds a complete folder).

    Args:
        path: The folder to (re)place. Its parent is created when missing.
        durable: fsync every file written and the parent folder.
        expected_bytes: About how much the folder holds, for the message when the disk fills up.

    Raises:
        DiskFull: The disk filled up while writing (the temporary folder is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging, old = _temporary(path, "tmp"), _temporary(path, "old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with _disk_full_reported(path, expected_bytes):
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
