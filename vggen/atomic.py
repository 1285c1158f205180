"""Atomic file writes: a reader sees the old file or the whole new one, never half.

What holds, precisely (each proved by a test in ``tests/faults/``):

* :func:`write_atomic` writes to ``.<name>.<pid>.<hex>.tmp`` beside the
  target, fsyncs it, renames it over the target and fsyncs the directory.  A
  process killed at any point leaves the old file whole (or no file, if there
  was none) plus, at worst, its temporary file; the next write to the same
  target removes the temporary files of writers that are no longer alive.
* Every failure (read-only file system, a directory or a file in the way, a
  full disk) is one :class:`VggenError` naming the path and the reason; the
  temporary file is removed on the way out, and a failure to remove it never
  hides the first error.
* :func:`check_writable` and :func:`check_directory` look at a path before a
  long job, so a path that cannot be written is reported before the work,
  not after it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path
from typing import IO, Callable

from vggen.errors import VggenError


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_dead_writers(directory: Path, pattern: re.Pattern) -> list[Path]:
    """Remove the files (or directories) in ``directory`` whose names ``pattern``
    matches and whose writer, the pid in the pattern's first group, is no longer alive."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m and not pid_alive(int(m.group(1))):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass                        # another writer removed it, or we may not: harmless
    return removed


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the ``.<name>.<pid>.<hex>.tmp`` files of dead writers of ``path``."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+\.tmp")
    return remove_dead_writers(path.parent if str(path.parent) else Path("."), pattern)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening a directory)."""
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


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass                                # e.g. the directory is not writable: nothing was made


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function of the open file) to ``path``.

    See the module docstring for what holds.  The file's mode follows the umask.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise VggenError(f"cannot write {path}: it is a directory")
    remove_stale_temporaries(path)
    tmp = parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(parent)
    except BaseException as e:
        _discard(tmp)
        if isinstance(e, OSError):
            raise VggenError(f"cannot write {path}: {_reason(e)}") from None
        raise
    return path


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_parent(path: Path, what: str) -> None:
    """The directory that will hold ``path`` exists or can be made, and is writable."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise VggenError(f"cannot write {what}{path}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise VggenError(f"cannot write {what}{path}: {base} is not writable")


def check_writable(path: str | os.PathLike, what: str = "") -> Path:
    """Raise a one-line VggenError now if ``path`` cannot be written as a file later.

    ``what`` names the option in the message (``"--metrics "``)."""
    path = Path(path)
    if path.is_dir():
        raise VggenError(f"cannot write {what}{path}: it is a directory")
    if path.exists() and not path.is_file():
        raise VggenError(f"cannot write {what}{path}: it is not a regular file")
    _check_parent(path, what)
    return path


def check_directory(path: str | os.PathLike, what: str = "") -> Path:
    """Make ``path`` a directory if it is none yet; raise a one-line VggenError if it
    cannot be one, or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VggenError(f"cannot use {what}{path}: it is a file, not a directory")
    _check_parent(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VggenError(f"cannot create {what}{path}: {_reason(e)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise VggenError(f"cannot write into {what}{path}: it is not writable")
    return path


__all__ = ["write_atomic", "check_writable", "check_directory", "remove_stale_temporaries",
           "remove_dead_writers", "fsync_directory", "pid_alive"]
