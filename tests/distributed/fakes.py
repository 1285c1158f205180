"""Ranks as threads of this process, and a fake of CuPy's NCCL module, so that
the communicators' code paths run in the CPU tests without MPI or a GPU."""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vggen.distributed.comm import Comm


class ThreadWorld:
    """``size`` ranks that meet at a barrier to swap values."""

    def __init__(self, size: int):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=30)
        self._slots: list = [None] * size

    def exchange(self, rank: int, value) -> list:
        """Every rank's ``value``, in rank order (each rank calls this at the same point)."""
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()
        return values


class ThreadComm(Comm):
    """A host communicator over a :class:`ThreadWorld` (blocking collectives)."""

    name = "threads"

    def __init__(self, world: ThreadWorld, rank: int):
        self.world, self.rank, self.size = world, rank, world.size
        self.local_rank, self.local_size = rank, world.size
        self.started: list[int] = []           # sizes of the buffers allreduce_start was given

    def allreduce_start(self, buffer):
        self.started.append(int(buffer.size))
        values = self.world.exchange(self.rank, np.array(buffer))
        total = values[0].copy()
        for v in values[1:]:
            total += v
        buffer[...] = total
        return None

    def poll(self, pending):
        return True

    def wait(self, pending):
        pass

    def allgather(self, array):
        return np.stack(self.world.exchange(self.rank, np.array(array)))

    def broadcast_bytes(self, data, root=0):
        return self.world.exchange(self.rank, data)[root]

    def abort(self, code):
        raise SystemExit(code)


def run_ranks(size: int, work) -> list:
    """``work(rank, world)`` on ``size`` threads; their results in rank order (a
    thread's exception is raised here)."""
    world = ThreadWorld(size)
    with ThreadPoolExecutor(size) as pool:
        futures = [pool.submit(work, rank, world) for rank in range(size)]
        return [f.result(timeout=60) for f in futures]


class FakeNccl:
    """The parts of ``cupy.cuda.nccl`` that NcclComm uses, summing "device"
    buffers (NumPy arrays, by address) over a :class:`ThreadWorld`."""

    NCCL_FLOAT32 = 7
    NCCL_SUM = 0

    def __init__(self, world: ThreadWorld):
        self.world = world
        self.communicators: list = []

    def get_unique_id(self):
        return (42, id(self.world))

    def NcclCommunicator(self, ndev, commId, rank):   # noqa: N802 - CuPy's name
        comm = _FakeCommunicator(self, ndev, commId, rank)
        self.communicators.append(comm)
        return comm


class _FakeCommunicator:
    def __init__(self, module: FakeNccl, ndev: int, unique_id, rank: int):
        self.module, self.ndev, self.unique_id, self.rank = module, ndev, unique_id, rank
        self.calls: list[tuple] = []
        self.aborted = False

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):   # noqa: N802
        assert datatype == FakeNccl.NCCL_FLOAT32 and op == FakeNccl.NCCL_SUM
        self.calls.append((sendbuf, recvbuf, count, stream))
        send = np.ctypeslib.as_array((ctypes.c_float * count).from_address(sendbuf))
        values = self.module.world.exchange(self.rank, send.copy())
        recv = np.ctypeslib.as_array((ctypes.c_float * count).from_address(recvbuf))
        recv[...] = sum(values[1:], values[0].copy())

    def abort(self):
        self.aborted = True
