"""Allreduce time against message size, through the communicator training uses.

    mpiexec -n N python -m vggen.tools.allreduce [--max-bytes B] [--width W] [--json]

Times ``MpiComm.allreduce_start`` + ``wait`` (nonblocking ``Iallreduce`` in
place, polled to completion, as a training step does) on float32 buffers
from 4 bytes up to ``--max-bytes``, in powers of 4.  Per size: a few warm-up
calls, then three batches of calls between barriers; a batch's time per
call is the slowest rank's, and the median batch is reported.  Then the
latency–bandwidth model ``t(n) = α + n/B`` is fitted by least squares on
the relative error over every size (so that the microsecond latencies count
as much as the millisecond transfers), and the model is compared with a
measured allreduce of the whole gradient of the network at ``--width`` (the
data-parallel step's one large collective).

Prints a table on stdout (or one JSON object with ``--json``).  A command,
not a test: the numbers are this machine's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

def _time_per_call(comm, mpi, buffer: np.ndarray, calls: int) -> float:
    mpi.COMM_WORLD.Barrier()
    start = time.perf_counter()
    for _ in range(calls):
        comm.wait([comm.allreduce_start(buffer)])
    mine = (time.perf_counter() - start) / calls
    return float(comm.allgather(np.array([mine])).max())


def measure(comm, mpi, nbytes: int, budget_s: float = 0.3) -> float:
    """Median over three batches of the slowest rank's seconds per allreduce of ``nbytes``."""
    buffer = np.ones(max(1, nbytes // 4), np.float32)
    first = _time_per_call(comm, mpi, buffer, 2)                     # warm-up, and a first estimate
    calls = int(min(1000, max(3, budget_s / 3 / max(first, 1e-7))))
    calls = int(comm.allgather(np.array([calls])).min())             # every rank the same count
    return float(np.median([_time_per_call(comm, mpi, buffer, calls) for _ in range(3)]))


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(α seconds, bandwidth bytes/s) of ``t = α + n/B``, least squares on the relative error."""
    n, t = np.array(sizes, float), np.array(seconds, float)
    slope, intercept = np.polyfit(n, t, 1, w=1.0 / t)
    return float(max(intercept, 0.0)), float(1.0 / slope) if slope > 0 else float("inf")


def gradient_size(width: int) -> int:
    """The number of parameters (gradient values) of the default network at ``width``."""
    from vggen.model.network import build_nodes, init_parameters

    params, _ = init_parameters(build_nodes(width, dropout=False), seed=0)
    return sum(int(p.size) for p in params.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vggen.tools.allreduce",
                                description="allreduce time against message size (run under mpiexec)")
    p.add_argument("--max-bytes", type=int, default=64 << 20, help="largest message (default: 64 MiB)")
    p.add_argument("--width", type=int, default=64,
                   help="also time the whole gradient of the network at this width (default: 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    from vggen.distributed.launch import connect

    comm = connect()
    if comm.size < 2:
        print("run it under mpiexec with 2 or more ranks: mpiexec -n 2 python -m vggen.tools.allreduce",
              file=sys.stderr)
        return 2
    from mpi4py import MPI

    sizes, nbytes = [], 4
    while nbytes <= args.max_bytes:
        sizes.append(nbytes)
        nbytes *= 4
    seconds = [measure(comm, MPI, n) for n in sizes]
    alpha, bandwidth = fit(sizes, seconds) if len(sizes) >= 2 else (0.0, 0.0)
    grad_values = gradient_size(args.width)
    grad_seconds = measure(comm, MPI, 4 * grad_values)
    result = {
        "ranks": comm.size, "library": MPI.Get_library_version().splitlines()[0].strip(),
        "sizes": [{"bytes": n, "seconds": t, "gb_per_s": n / t / 1e9} for n, t in zip(sizes, seconds)],
        "fit": {"alpha_s": alpha, "bandwidth_bytes_per_s": bandwidth},
        "gradient": {"width": args.width, "values": grad_values, "bytes": 4 * grad_values,
                     "seconds": grad_seconds, "model_seconds": alpha + 4 * grad_values / bandwidth
                     if bandwidth else None},
    }
    if comm.rank == 0:
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"allreduce (sum, float32, in place) over {comm.size} ranks: {result['library']}")
            print(f"{'bytes':>12}  {'time':>12}  {'GB/s':>8}")
            for row in result["sizes"]:
                print(f"{row['bytes']:>12,}  {row['seconds'] * 1e6:>10.1f} µs  {row['gb_per_s']:>8.3f}")
            print(f"fit: t = {alpha * 1e6:.1f} µs + n / {bandwidth / 1e9:.2f} GB/s")
            g = result["gradient"]
            model = f"{g['model_seconds'] * 1e3:.1f} ms" if g["model_seconds"] is not None else "?"
            print(f"gradient of the network at width {args.width}: {g['values']:,} values "
                  f"({g['bytes'] / 1e6:.1f} MB): {g['seconds'] * 1e3:.1f} ms measured, {model} by the fit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
