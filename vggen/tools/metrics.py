"""The ``--metrics`` file of ``vggen train``: one JSON line per epoch, one writer at a time.

What holds (each proved by a test in ``tests/faults/``):

* **One writer.**  A training run holds an exclusive ``flock`` on the file
  for as long as it runs; a second run naming the same file stops at once
  with one line, before any work, instead of interleaving its rows.
* **Rows follow checkpoints.**  An epoch's row is appended (one ``write``,
  then ``fsync``) only after that epoch's checkpoint is on disk, so the file
  never holds an epoch the checkpoint lacks.
* **Resume rewrites the past from the checkpoint.**  A resumed run replaces
  the file's rows with the checkpoint's own history (epochs 1…k), which drops
  rows of epochs run after the checkpoint by a run that was then killed, and
  restores a row lost between the checkpoint and its append.  A file whose
  rows contradict that history belongs to another run and is refused.
* **A fresh run does not overwrite another run's rows:** it refuses a
  non-empty file (remove it, or name another).
"""

from __future__ import annotations

import json
import os

from vggen.atomic import check_writable
from vggen.errors import VggenError

try:                                      # POSIX; elsewhere the lock is not taken
    import fcntl
except ImportError:                       # pragma: no cover
    fcntl = None


def _rows(text: str) -> list[dict | None]:
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None                    # a torn line of a killed writer
        rows.append(row if isinstance(row, dict) else None)
    return rows


class MetricsLog:
    """The metrics file, opened and locked for one training run."""

    def __init__(self, path: str | os.PathLike):
        self.path = check_writable(path, "--metrics ")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        except OSError as e:
            raise VggenError(f"cannot write --metrics {self.path}: {e.strerror or e}") from None
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise VggenError(f"--metrics {self.path} is being written by another vggen train; "
                                 f"wait for it, or name another file") from None

    def _read(self) -> str:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", errors="replace")

    def _replace_contents(self, rows: list[dict]) -> None:
        os.ftruncate(self._fd, 0)
        self._write("".join(json.dumps(r) + "\n" for r in rows))

    def _write(self, text: str) -> None:
        try:
            if text:
                os.write(self._fd, text.encode("utf-8"))
            os.fsync(self._fd)
        except OSError as e:
            raise VggenError(f"cannot write --metrics {self.path}: {e.strerror or e}") from None

    def start_fresh(self) -> None:
        """A new run: the file must hold no other run's rows."""
        existing = [r for r in _rows(self._read()) if r is not None]
        if existing:
            self.close()
            raise VggenError(f"--metrics {self.path} already holds {len(existing)} epoch rows of "
                             f"another run: remove it or name another file "
                             f"(a resumed run, --resume, continues its file)")
        self._replace_contents([])

    def start_resumed(self, history: list[dict], checkpoint: str | os.PathLike) -> None:
        """A run resumed after ``len(history)`` epochs: the file becomes that history."""
        by_epoch = {r.get("epoch"): r for r in history}
        for row in _rows(self._read()):
            if row is None or row.get("epoch") not in by_epoch:
                continue                  # torn, or after the checkpoint: dropped
            if row != by_epoch[row["epoch"]]:
                self.close()
                raise VggenError(f"--metrics {self.path} holds an epoch {row['epoch']} row that is "
                                 f"not the one in {checkpoint}: it belongs to another run; "
                                 f"name another file")
        self._replace_contents(history)

    def append(self, row: dict) -> None:
        self._write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)            # releases the lock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["MetricsLog"]
