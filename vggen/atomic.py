"""Atomic file writes: a reader sees the old file or the whole new one, never half."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import IO, Callable

from vggen.errors import VggenError


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function of the open file) to ``path``.

    The bytes go to a temporary file beside ``path``, are flushed to disk, and
    the temporary file is renamed over ``path``; on any failure it is removed.
    The file's mode follows the umask.  OSError becomes a VggenError naming
    the path.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise VggenError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path
