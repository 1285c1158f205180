"""The bound on every wait for other ranks: past it, one line and the process ends.

A rank waits for the others in MPI's blocking calls and, on the GPU, in the
host's wait for a stream that holds an NCCL collective.  If a peer died
without the launcher ending the job (some launchers let the other tasks run
on), or hangs, such a wait never returns, and no code after it runs.  So a
daemon thread watches: the main thread arms it around each such wait
(:meth:`Watchdog.bounded`); an armed wait that lasts longer than the
timeout (``VGGEN_COMM_TIMEOUT``, default 300 s) makes the thread print

    vggen: error: rank R: no answer from the other ranks for T s (VGGEN_COMM_TIMEOUT): …

and end the process with status 2 (``os._exit``: the main thread is stuck
inside MPI or CUDA, and MPI may not be called from this thread).  The
launcher then ends the other ranks, or their own watchdogs do.

The thread takes no MPI calls and no locks the main thread holds; it wakes
ten times per timeout (at most once a second) to look at the deadline.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

# The exit status of a rank that gave up waiting (the command line's for an error).
TIMEOUT_STATUS = 2


class Watchdog:
    """Ends this process when an armed wait outlasts ``timeout`` seconds."""

    def __init__(self, rank: int, timeout: float, end: Callable[[int], None] = os._exit):
        self.rank, self.timeout, self._end = rank, timeout, end
        self._deadline: float | None = None
        self._what = ""
        self._thread: threading.Thread | None = None
        self.fired = False

    @contextmanager
    def bounded(self, what: str) -> Iterator[None]:
        """Arm the watchdog for the body (a wait for the other ranks, named by ``what``);
        an outer armed section is re-armed afterwards with its own deadline."""
        outer = (self._deadline, self._what)
        self._what, self._deadline = what, time.monotonic() + self.timeout
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="vggen-watchdog", daemon=True)
            self._thread.start()
        try:
            yield
        finally:
            self._deadline, self._what = outer

    def _watch(self) -> None:
        interval = min(1.0, self.timeout / 10)
        while not self.fired:
            time.sleep(interval)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self.fired = True
                print(f"vggen: error: rank {self.rank}: no answer from the other ranks for "
                      f"{self.timeout:g} s (VGGEN_COMM_TIMEOUT) in {self._what}: a rank died or hangs",
                      file=sys.stderr, flush=True)
                self._end(TIMEOUT_STATUS)


__all__ = ["Watchdog", "TIMEOUT_STATUS"]
