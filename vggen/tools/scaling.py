"""Projected data-parallel scaling efficiency, from a latency–bandwidth model.

    python -m vggen.tools.scaling [--step-ms T] [--batch B] [--json]

Weak scaling (each GPU keeps its batch): a step on N GPUs is the one-GPU
step plus the part of the gradient allreduce the backward does not hide.
The allreduce of S bytes takes

    T(N, S) = 2·⌈log₂ N⌉·α + 2(N − 1)/N · S / B

the latency of a tree (NCCL's choice for latency) and the bandwidth term of
a ring (every byte crosses 2(N − 1)/N times; B is the link's bus bandwidth
per GPU).  Without overlap the whole T is exposed; with overlap (buckets
started as the backward writes them, ``vggen/distributed/gradients.py``) only
what exceeds the backward's time, and never less than the last bucket's:

    exposed = max(T(N, bucket), T(N, S) − f·step),   efficiency = step / (step + exposed)

with f the backward's share of the step.  The link classes are typical
published figures, not measurements here: an NVLink-class fabric (H100
NVLink 4, bus bandwidth ≈ 360 GB/s per GPU, α ≈ 3 µs) and an
InfiniBand-class one (NDR 400 Gb/s per GPU, ≈ 45 GB/s, α ≈ 6 µs); each is
taken as the whole fabric at every N.  The model is the one fitted to the
shared-memory measurements of ``python -m vggen.tools.allreduce``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

from vggen.distributed.gradients import BUCKET_BYTES


@dataclass(frozen=True)
class Link:
    name: str
    alpha_s: float            # latency per tree level
    bus_bytes_per_s: float    # bus bandwidth per GPU


LINKS = (Link("NVLink-class", 3e-6, 360e9), Link("InfiniBand-class", 6e-6, 45e9))

# The default network at width 64: 14,987,200 float32 gradient values
# (python -m vggen.tools.allreduce --width 64 counts them).
GRADIENT_BYTES = 4 * 14_987_200
BACKWARD_SHARE = 2 / 3          # the backward's part of a step (two of its three passes)
# One-GPU fp32 training steps, width 64, measured on an H100 (README, Performance):
# 6,370 images/s at B = 64 and 7,669 at B = 256.
STEP_S = {64: 64 / 6370, 256: 256 / 7669}


def allreduce_seconds(n: int, nbytes: float, link: Link) -> float:
    if n < 2:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * link.alpha_s + 2 * (n - 1) / n * nbytes / link.bus_bytes_per_s


def efficiency(n: int, step_s: float, link: Link, overlap: bool, gradient_bytes: float = GRADIENT_BYTES,
               backward_share: float = BACKWARD_SHARE) -> float:
    total = allreduce_seconds(n, gradient_bytes, link)
    if overlap:
        last = allreduce_seconds(n, min(BUCKET_BYTES, gradient_bytes), link)
        exposed = max(last, total - backward_share * step_s) if n > 1 else 0.0
    else:
        exposed = total
    return step_s / (step_s + exposed)


def table(step_s: float, ranks=(8, 64, 512)) -> list[dict]:
    return [{"link": link.name, "gpus": n, "allreduce_ms": allreduce_seconds(n, GRADIENT_BYTES, link) * 1e3,
             "efficiency_no_overlap": efficiency(n, step_s, link, False),
             "efficiency_overlap": efficiency(n, step_s, link, True)}
            for link in LINKS for n in ranks]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vggen.tools.scaling",
                                description="projected weak-scaling efficiency of data-parallel training")
    p.add_argument("--batch", type=int, default=256, choices=sorted(STEP_S),
                   help="per-GPU batch whose measured one-GPU step is used (default: 256)")
    p.add_argument("--step-ms", type=float, help="a one-GPU step time of your own instead (ms)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    step_s = args.step_ms / 1e3 if args.step_ms else STEP_S[args.batch]
    rows = table(step_s)
    if args.json:
        print(json.dumps({"step_s": step_s, "gradient_bytes": GRADIENT_BYTES, "rows": rows}, indent=2))
        return 0
    print(f"one-GPU step {step_s * 1e3:.1f} ms, gradient {GRADIENT_BYTES / 1e6:.1f} MB")
    print(f"{'link':<18}{'GPUs':>6}{'allreduce':>12}{'no overlap':>12}{'overlap':>10}")
    for r in rows:
        print(f"{r['link']:<18}{r['gpus']:>6}{r['allreduce_ms']:>9.2f} ms"
              f"{r['efficiency_no_overlap']:>11.0%}{r['efficiency_overlap']:>10.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
