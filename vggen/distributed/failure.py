"""How a run of several ranks fails: loudly, on one line, never by hanging.

Two kinds of error:

* **agreed** (:class:`CollectiveError`): every rank raises it at the same
  point because they compared notes — :func:`agree` ran a step on every rank
  and gathered who failed, or the ranks gathered the same losses or hashes.
  Rank 0 prints the one line; the others exit with the same status in
  silence; every rank reaches ``MPI_Finalize``.
* **one rank's** (anything else: a write that failed on rank 0, a bug):
  that rank prints ``vggen: error: rank R: …`` and calls ``MPI_Abort``, which
  ends every rank at once (the launcher adds its own line after ours).  A rank
  killed outright is the launcher's to report: ``mpiexec`` ends the others.
  A rank that waits too long for the others (one hangs, or died and the
  launcher let the rest run on) is ended by its watchdog with one line
  (:mod:`vggen.distributed.watchdog`).

:func:`run_ranks` applies this around a command; a single process is left
alone, its errors reaching the command line as they always have.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable, TypeVar

from vggen.distributed.comm import Comm
from vggen.distributed.launch import connect, launched_rank
from vggen.errors import VggenError
from vggen.tools.progress import LOGGER_NAME

T = TypeVar("T")

# Exit statuses, as the command line's: a VggenError 2, an interruption 130, a bug 1.
ERROR_STATUS, INTERRUPTED_STATUS, BUG_STATUS = 2, 130, 1


class CollectiveError(VggenError):
    """An error every rank raises together; rank 0 alone prints it."""


def agree(comm: Comm, action: Callable[[], T]) -> T:
    """``action()`` on every rank; if it raised a VggenError on any of them,
    every rank raises one :class:`CollectiveError`: the message itself when
    all ranks failed alike, else the lowest failing rank's, naming it."""
    if comm.size == 1:
        return action()
    result, error = None, None
    try:
        result = action()
    except VggenError as e:
        error = str(e)
    failed = [(rank, message) for rank, message in enumerate(comm.allgather_object(error))
              if message is not None]
    if failed:
        rank, message = failed[0]
        alike = len(failed) == comm.size and all(m == message for _, m in failed)
        raise CollectiveError(message if alike else f"rank {rank}: {message}")
    return result


def _quiet_followers(comm: Comm) -> None:
    """Ranks other than 0 keep warnings and errors (and -v's detail): rank 0 tells the progress."""
    logger = logging.getLogger(LOGGER_NAME)
    if comm.rank != 0 and logger.getEffectiveLevel() == logging.INFO:
        logger.setLevel(logging.WARNING)


def run_ranks(work: Callable[[Comm], T]) -> T:
    """``work(comm)`` on this process's communicator, failing as the module docstring says."""
    try:
        comm = connect()
    except VggenError:
        launched = launched_rank()
        if launched is not None and launched[0] != 0:
            raise SystemExit(ERROR_STATUS) from None     # every rank failed alike: rank 0 says it
        raise
    if comm.size == 1:
        return work(comm)
    _quiet_followers(comm)
    try:
        return work(comm)
    except CollectiveError:
        if comm.rank == 0:
            raise                                      # the command line prints it
        raise SystemExit(ERROR_STATUS) from None
    except KeyboardInterrupt:                          # every rank got the launcher's SIGINT
        if comm.rank == 0:
            print("vggen: interrupted", file=sys.stderr, flush=True)
        comm.abort(INTERRUPTED_STATUS)
    except Exception as e:  # noqa: BLE001 - any failure of one rank must end them all
        if isinstance(e, VggenError):
            line, status = str(e), ERROR_STATUS
        else:
            traceback.print_exc()
            line, status = f"{type(e).__name__}: {e}", BUG_STATUS
        print(f"vggen: error: rank {comm.rank}: {line}", file=sys.stderr, flush=True)
        comm.abort(status)


__all__ = ["CollectiveError", "agree", "run_ranks"]
