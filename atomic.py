"""Atomic and durable file writes: every file the project writes goes through here.

A write goes to a temp file beside its target, is fsynced and renamed over it, so a crash never leaves a
partial file under the final name. Used by models/ (exports), data/, report/ and the run package alike,
which is why it is a module of its own and not part of the run package that models/ may not import.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from typing import IO, Any, Iterator

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


def umask() -> int:
    """The process's umask (read by setting and restoring it: the only way the OS offers)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_name(path: str, suffix: str = "tmp") -> str:
    """`.NAME.PID.RANDOM.tmp` beside `path`: hidden, unique, and matched by the stale-file clean-ups
    (run.output.remove_stale_temp_files, the report writer) by its `.NAME.` prefix and its suffix."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.{suffix}")


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None,
                temp: str | os.PathLike[str] | None = None, durable: bool = True) -> Iterator[IO]:
    """Write `path` in one step: a temp file beside it, fsynced and renamed over it when the block ends.

    On any failure the temp file is removed and `path` is as it was. The file gets the umask's mode (644 under
    umask 022), as `open` would give it. A full disk or read-only file system raises :class:`DiskWriteError`.
    `temp`: a fixed temp name instead of a unique one, for a writer whose clean-up looks for that name (the
    Flickr30k extraction resumes by it). `durable=False` skips the fsyncs, for bulk files a re-run checks anyway.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = temp_name(path) if temp is None else os.fspath(temp)
    try:
        os.makedirs(directory, exist_ok=True)
        # O_EXCL: never clobber someone else's temp file (a fixed name is ours to reuse); 0o666 honours the umask.
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if temp is None else os.O_TRUNC)
        fd = os.open(tmp_path, flags, 0o666)
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
            raise DiskWriteError(error.errno, f"cannot write {path} ({os.strerror(error.errno)}) in {directory}; "
                                 f"{kept}. Free space there or write to a writable disk with room") from None
        raise
    if durable:
        _fsync_dir(directory)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` that never leaves a partial file at ``path`` (see :func:`atomic_file`).

    A full disk or read-only file system raises :class:`DiskWriteError` with the space the file needs.
    """
    path = os.fspath(path)
    try:
        with atomic_file(path) as f:
            torch.save(obj, f)
    except DiskWriteError as error:
        needed = _tensor_bytes(obj)
        directory = os.path.dirname(os.path.abspath(path))
        kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
        raise DiskWriteError(error.errno, f"cannot write {path} ({os.strerror(error.errno)}): it needs about "
                             f"{human_bytes(needed)} ({needed:,} bytes) in {directory}; {kept}. Free that "
                             "much space there or point --output_dir at a writable disk with room") from None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace a file in one step (temp file beside it, fsync, rename): never a partial file at `path`."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _follow_umask(folder: str) -> None:
    """Folders 777 and files 666 less the umask, below and at `folder` (mkdtemp makes 700; some writers 600)."""
    mask = umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o100
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


@contextmanager
def atomic_folder(target: str | os.PathLike[str], replace: bool = True) -> Iterator[str]:
    """Build a folder in a temp folder beside `target`, then put it at `target` in one step.

    An older `target` is renamed away first and deleted after the new one is in place, so a crash leaves the old
    or the new folder there (at worst a stale `.NAME.*.old` beside it), never a mix. `replace=False` refuses to
    replace a non-empty `target` (FileExistsError). Modes follow the umask. On failure the temp folder goes.
    """
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = temp_name(target)
    os.mkdir(staging)
    try:
        yield staging
        _follow_umask(staging)
        old = None
        if os.path.isdir(target) and os.listdir(target):
            if not replace:
                raise FileExistsError(errno.EEXIST, "not empty", target)
            old = temp_name(target, "old")
            os.replace(target, old)
        elif os.path.isdir(target):
            os.rmdir(target)
        os.replace(staging, target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(parent)


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
