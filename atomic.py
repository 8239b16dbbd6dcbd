"""Atomic and durable file writes: every file the project writes goes through here.

A write goes to a temp file beside its target, is fsynced and renamed over it, so a crash never leaves a
partial file under the final name. Used by models/ (exports), data/, report/ and the run package alike,
which is why it is a module of its own and not part of the run package that models/ may not import.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
from typing import Any

import torch

class DiskWriteError(RuntimeError):
    """A file could not be written (disk full, read-only file system, quota); the previous file is intact."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value


# errno values that a user fixes by making room or pointing the output elsewhere, not by changing code.
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as df -H prints them)."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensor storages in a nested checkpoint, each counted once: about what torch.save writes."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` that never leaves a partial file at ``path``.

    Writes to a temp file in the same directory, fsyncs it and renames it over
    ``path``; on any failure the temp file is removed and ``path`` is untouched.
    A full disk or read-only file system raises :class:`DiskWriteError` with the space the file needs.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        # O_EXCL: never clobber someone else's temp file; mode 0o666 honours the umask.
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        try:
            os.remove(tmp_path)
        except OSError:
            pass
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            needed = _tensor_bytes(obj)
            kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
            raise DiskWriteError(error.errno, f"cannot write {path} ({os.strerror(error.errno)}): it needs about "
                                 f"{human_bytes(needed)} ({needed:,} bytes) in {directory}; {kept}. Free that "
                                 "much space there or point --output_dir at a writable disk with room") from None
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replace a file in one step (temp file beside it, fsync, rename): never a partial file at `path`."""
    tmp_path = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp_path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_json(path: str, record: dict) -> None:
    """Append one JSON line and make it durable (a metrics record survives a crash right after it)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: str) -> None:
    """Persist the rename itself (best effort; not possible on every platform)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
