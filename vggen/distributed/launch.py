"""Which rank this process is, and what it may use of its host.

A process started by an MPI launcher (``mpiexec``, ``mpirun``, ``srun``)
finds the launcher's variables in its environment (:data:`RANK_VARIABLES`);
only then is mpi4py imported and MPI initialised, so a plain ``vggen train``
never touches MPI.  The rank, the number of ranks and the local rank (this
process among those on its host) are then MPI's: the environment only says
whether to ask.  A launcher that says N ranks while MPI sees one means that
``mpiexec`` and mpi4py belong to different MPI libraries, which is refused
rather than run as N copies of one run.

Cores: a rank of several on one host runs its OpenMP kernels on its share
of the host's cores (``OMP_NUM_THREADS``, set before the kernels are loaded,
unless the user set it), or on the cores the launcher bound it to.  Without
that, N ranks would each start one thread per core and fight over them.

GPUs: rank ``local_rank`` of a host uses device ``local_rank mod devices``.
"""

from __future__ import annotations

import logging
import os

from vggen.distributed.comm import Comm, SingleComm
from vggen.errors import VggenError

log = logging.getLogger(__name__)

# Set by MPI launchers in every rank's environment: (rank variable, size variable or None).
RANK_VARIABLES = (
    ("PMI_RANK", "PMI_SIZE"),                            # MPICH's Hydra, Intel MPI, srun --mpi=pmi2
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),    # Open MPI
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),      # MVAPICH
    ("PMIX_RANK", None),                                 # srun --mpi=pmix, PRRTE
)


def launched_rank(environ=None) -> tuple[int, int | None] | None:
    """(rank, number of ranks or None when the launcher does not say) from the
    launcher's variables, or None for a process no MPI launcher started."""
    env = os.environ if environ is None else environ
    for rank_name, size_name in RANK_VARIABLES:
        if rank_name in env:
            try:
                rank = int(env[rank_name])
                size = int(env[size_name]) if size_name and size_name in env else None
            except ValueError:
                continue
            return rank, size
    return None


def connect(environ=None) -> Comm:
    """This process's communicator: :class:`SingleComm` unless an MPI launcher
    started it as one of several ranks, then :class:`vggen.distributed.mpi.MpiComm`."""
    launched = launched_rank(environ)
    if launched is None:
        return SingleComm()
    rank, size = launched
    try:
        import mpi4py
    except ImportError:
        if size == 1:
            return SingleComm()
        ranks = f"rank {rank} of {size}" if size else f"rank {rank}"
        raise VggenError(f"started by an MPI launcher as {ranks}, but mpi4py is not installed: "
                         f"pip install 'vggen[mpi]'") from None
    mpi4py.rc.thread_level = "funneled"   # MPI is called from the main thread only
    from vggen.distributed.mpi import MpiComm

    comm = MpiComm()
    if size is not None and comm.size != size:
        raise VggenError(f"the launcher started {size} ranks but MPI sees {comm.size}: mpiexec and "
                         f"mpi4py use different MPI libraries; run the mpiexec of the MPI that "
                         f"mpi4py loads (`python -m mpi4py --mpi-library`)")
    if comm.size == 1:
        return SingleComm()
    share_cores(comm)
    return comm


def share_cores(comm: Comm, environ=None) -> int | None:
    """Give this rank its share of the host's cores for OpenMP (see the module
    docstring); returns the thread count set, or None when the user chose one."""
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        return None
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    host = os.cpu_count() or mine
    threads = mine if mine < host else max(1, host // max(1, comm.local_size))
    env["OMP_NUM_THREADS"] = str(threads)
    log.debug("rank %d: %d OpenMP threads (%d of this host's ranks, %d cores)",
              comm.rank, threads, comm.local_size, host)
    return threads


def select_device(comm: Comm) -> int:
    """Make device ``local_rank mod devices`` current for CuPy; returns its number."""
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    if count < 1:
        raise VggenError("--target cuda: no GPU is visible to this rank")
    device = comm.local_rank % count
    cupy.cuda.Device(device).use()
    return device


__all__ = ["connect", "launched_rank", "share_cores", "select_device", "RANK_VARIABLES"]
