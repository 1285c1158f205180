"""The NCCL communicator (CuPy's ``cupy.cuda.nccl``): GPU gradients on the step's stream.

:class:`NcclComm` sums device buffers with ``ncclAllReduce`` queued on the
current CUDA stream, the one the step's kernels run on: the reduction starts
once the kernels queued before it (a bucket's backward) have finished, and
the kernels queued after it (the update) read the sum, with no host wait in
between.  :meth:`NcclComm.wait` therefore has nothing to wait for; the host
waits later, for the step's losses, so :meth:`NcclComm.step` bounds the
whole step: a peer that never joins the collective ends the job by timeout.

Everything on the host (hashes, losses, statistics, the NCCL id itself at
start) goes through the host communicator it is built on, an
:class:`vggen.distributed.mpi.MpiComm`.

The ``nccl`` module and the stream are parameters so that the tests drive
this code on the CPU with a fake module (``tests/distributed``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, NoReturn

import numpy as np

from vggen.distributed.comm import Comm
from vggen.errors import VggenError


def nccl_module():
    """CuPy's NCCL module, or a VggenError saying why it cannot be had."""
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise VggenError(f"--target cuda on several ranks sums the gradients with NCCL, which "
                         f"this CuPy cannot load ({e}): install a CuPy built with NCCL") from None
    if not getattr(nccl, "available", True):
        raise VggenError("--target cuda on several ranks sums the gradients with NCCL, which "
                         "this CuPy was built without: install a CuPy built with NCCL")
    return nccl


def _current_stream() -> int:
    import cupy
    return cupy.cuda.get_current_stream().ptr


def device_pointer(buffer) -> int:
    """The address of a CuPy array's data (a NumPy array's, for the CPU fake)."""
    data = getattr(buffer, "data", None)
    ptr = getattr(data, "ptr", None)
    return int(ptr) if ptr is not None else int(buffer.ctypes.data)


class NcclComm(Comm):
    """Device buffers through NCCL; host collectives through ``host``."""

    name = "nccl"

    def __init__(self, host: Comm, nccl=None, stream: Callable[[], int] | None = None):
        self.host = host
        self.rank, self.size = host.rank, host.size
        self.local_rank, self.local_size = host.local_rank, host.local_size
        self._nccl = nccl_module() if nccl is None else nccl
        self._stream = _current_stream if stream is None else stream
        unique_id = self._nccl.get_unique_id() if host.rank == 0 else None
        unique_id = host.broadcast_object(unique_id)
        self._comm = self._nccl.NcclCommunicator(host.size, unique_id, host.rank)

    def allreduce_start(self, buffer) -> Any:
        if np.dtype(buffer.dtype) != np.float32:
            raise VggenError(f"NCCL sums float32 gradients here; got {buffer.dtype}")
        ptr = device_pointer(buffer)
        self._comm.allReduce(ptr, ptr, int(buffer.size), self._nccl.NCCL_FLOAT32,
                             self._nccl.NCCL_SUM, self._stream())
        return None                       # ordered on the stream: nothing for the host to wait on

    def poll(self, pending: list) -> bool:
        return True

    def wait(self, pending: list) -> None:
        pass

    def allgather(self, array: np.ndarray) -> np.ndarray:
        return self.host.allgather(array)

    def bounded(self, what: str) -> AbstractContextManager:
        return self.host.bounded(what)

    def step(self) -> AbstractContextManager:
        # the host's wait for the step's losses stands behind the NCCL sums on the stream
        return self.host.bounded("a training step (its NCCL sums)")

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        return self.host.broadcast_bytes(data, root)

    def abort(self, code: int) -> NoReturn:
        try:                              # free the GPU side first: its kernels may wait on a dead peer
            self._comm.abort()
        except Exception:                 # noqa: BLE001 - ending the job matters more than why this failed
            pass
        self.host.abort(code)


__all__ = ["NcclComm", "nccl_module", "device_pointer"]
