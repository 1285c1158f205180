"""The communicator every collective of a data-parallel run goes through.

:class:`Comm` is the interface; :class:`SingleComm` is the world of one
process, where every collective is the identity, so a single-process run and
a rank of N go through the same code.  :class:`vggen.distributed.mpi.MpiComm`
and :class:`vggen.distributed.nccl.NcclComm` are the real ones.

Two kinds of collective:

* **the gradient's**: :meth:`Comm.allreduce_start` sums a float32 buffer
  over the ranks in place and returns at once; :meth:`Comm.wait` finishes
  what was started.  On the CPU the buffer is a NumPy array (MPI's
  ``Iallreduce``); on the GPU a CuPy array (NCCL, ordered on the stream);
* **small host collectives** (hashes, losses, statistics, a checkpoint at
  start): :meth:`Comm.allgather` of a NumPy array, and objects by pickle
  through :meth:`Comm.broadcast_bytes` and :meth:`Comm.allgather`.

Every wait for the other ranks is bounded (``VGGEN_COMM_TIMEOUT``, by
:mod:`vggen.distributed.watchdog`): a rank that died or hangs ends the job
with one line, never a hang.  :meth:`Comm.bounded` arms the same bound around
a caller's own wait; :meth:`Comm.step` around a training step where the
host's wait for the device stands behind the Comm's collectives (NCCL).
"""

from __future__ import annotations

import os
import pickle
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NoReturn

import numpy as np

from vggen.errors import VggenError

# How long a rank waits for the others in one collective before it stops the job.
DEFAULT_TIMEOUT_S = 300.0


def comm_timeout() -> float:
    """Seconds a collective may wait for the other ranks: ``VGGEN_COMM_TIMEOUT``, else 300."""
    raw = os.environ.get("VGGEN_COMM_TIMEOUT")
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise VggenError(f"VGGEN_COMM_TIMEOUT must be a number of seconds > 0, got {raw!r}")
    return value


class Comm(ABC):
    """The ranks of one run: who this process is, and the collectives among them."""

    name = "?"
    rank = 0
    size = 1
    local_rank = 0          # among the ranks on this host
    local_size = 1

    # ---- the gradient's collectives
    @abstractmethod
    def allreduce_start(self, buffer) -> Any:
        """Start summing ``buffer`` (contiguous float32, the same length on every
        rank) over the ranks, in place; returns what :meth:`wait` takes."""

    @abstractmethod
    def poll(self, pending: list) -> bool:
        """Let started collectives progress without blocking; True when all are done."""

    @abstractmethod
    def wait(self, pending: list) -> None:
        """Finish every collective in ``pending`` (bounded by ``VGGEN_COMM_TIMEOUT``)."""

    # ---- small host collectives
    @abstractmethod
    def allgather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's ``array`` (same shape and dtype on all), stacked in rank order."""

    @abstractmethod
    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """``root``'s ``data`` on every rank (the others pass None)."""

    def broadcast_object(self, obj: Any = None, root: int = 0) -> Any:
        """``root``'s picklable ``obj`` on every rank."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == root else None
        return pickle.loads(self.broadcast_bytes(data, root))

    def allgather_object(self, obj: Any) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        lengths = self.allgather(np.array([data.size], np.int64))[:, 0]
        padded = np.zeros(int(lengths.max()), np.uint8)
        padded[:data.size] = data
        rows = self.allgather(padded)
        return [pickle.loads(rows[r, :int(n)].tobytes()) for r, n in enumerate(lengths)]

    # ---- the bound on waiting
    def bounded(self, what: str) -> AbstractContextManager:
        """A section that waits for the other ranks (``what`` names it in the timeout's
        line): past ``VGGEN_COMM_TIMEOUT`` in it, this rank ends the job."""
        return nullcontext()

    def step(self) -> AbstractContextManager:
        """The section of one training step.  Unbounded where every wait for the others
        is one of this Comm's own collectives (each bounded there); a Comm whose sums
        the host waits for only through the device (NCCL) bounds the whole step."""
        return nullcontext()

    # ---- the end
    @abstractmethod
    def abort(self, code: int) -> NoReturn:
        """End every rank of the job now with exit status ``code``."""

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} ({self.name})"


class SingleComm(Comm):
    """One process: every collective is the identity."""

    name = "single"

    def allreduce_start(self, buffer) -> Any:
        return None

    def poll(self, pending: list) -> bool:
        return True

    def wait(self, pending: list) -> None:
        pass

    def allgather(self, array: np.ndarray) -> np.ndarray:
        return np.array(array)[None]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        if data is None:
            raise VggenError("broadcast_bytes: the root's data is missing")
        return data

    def abort(self, code: int) -> NoReturn:
        raise SystemExit(code)


__all__ = ["Comm", "SingleComm", "comm_timeout", "DEFAULT_TIMEOUT_S"]
