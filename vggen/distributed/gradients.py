"""The gradient of a data-parallel step: summed over micro-batches and ranks, bucket by bucket.

The network's parameter gradients are views of one flat vector
(``Network.flat_grads``, the vector the update kernel reads), laid out in
node order.  The backward pass runs the nodes last to first, so the
vector's tail is final first.  The vector is cut into **buckets** — runs of
whole nodes' gradients of about :data:`BUCKET_BYTES`, from the tail — and a
bucket's allreduce is started the moment the backward of its first node has
run (``Network.backward``'s ``after_node`` callback), while the backward goes
on with the nodes before it.  MPI's ``Iallreduce`` sums in place; polling
after every node keeps it moving (MPI progresses inside MPI calls).  On the
GPU, NCCL queues the sum on the step's stream behind the bucket's kernels.

With ``accumulate`` K > 1 the gradients of a rank's K micro-batches are
added into a second vector, node by node as each backward produces them,
and the buckets of that sum are reduced during the last micro-batch's
backward.  At the end the sum of all N·K micro-batch gradients is scaled by
1/(N·K) into ``flat_grads``: each micro-batch gradient is that of its mean
loss, so this is the gradient of the global batch's mean loss.  One process
with ``--accumulate N`` adds the same N gradients in the same order as N
ranks (for N = 2 the sum of two is the same in either order), so the two
agree bit for bit where the kernels are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from vggen.distributed.comm import Comm
from vggen.errors import VggenError

# A bucket's size: large enough that one allreduce runs at the bandwidth of a
# host's shared memory (measured with vggen.tools.allreduce, MPICH, 2 ranks:
# about 2 GB/s at 1–4 MB, 1 GB/s at 64 KB), small enough that the first starts
# early in the backward (the width-64 network's 60 MB make 8 buckets of whole
# layers: its largest convolutions hold 9.4 MB each).
BUCKET_BYTES = 4 << 20


@dataclass(frozen=True)
class Bucket:
    start: int              # elements of the flat gradient: [start, stop)
    stop: int
    ready_after: int        # the node whose backward completes it (the bucket's first node)


def parameter_ranges(net) -> dict[int, list[tuple[int, int]]]:
    """Per node index, the [start, stop) of each of its parameters' gradients in
    ``net.flat_grads`` (whose views are laid out in ``net.params`` order)."""
    offsets, at = {}, 0
    for key, p in net.params.items():
        offsets[key] = (at, at + int(p.size))
        at += int(p.size)
    if at != int(net.flat_grads.size):
        raise VggenError(f"the parameters hold {at} values but the flat gradient {net.flat_grads.size}")
    return {k: [offsets[key] for key in node.params.values()]
            for k, node in enumerate(net.nodes) if node.params}


def plan_buckets(ranges: dict[int, list[tuple[int, int]]], bucket_elements: int) -> list[Bucket]:
    """Buckets of whole nodes' gradients, from the last node back, each closed once it
    holds ``bucket_elements`` or the next node's gradients do not adjoin it."""
    buckets: list[Bucket] = []
    start = stop = first = None
    for k in sorted(ranges, reverse=True):
        lo = min(a for a, _ in ranges[k])
        hi = max(b for _, b in ranges[k])
        if start is not None and hi != start:        # not adjoining: a bucket must be one slice
            buckets.append(Bucket(start, stop, first))
            start = None
        if start is None:
            start, stop = lo, hi
        start, first = lo, k
        if stop - start >= bucket_elements:
            buckets.append(Bucket(start, stop, first))
            start = None
    if start is not None:
        buckets.append(Bucket(start, stop, first))
    return buckets


class GradientReduction:
    """The gradient of one data-parallel step (see the module docstring).

    Per step: ``after_node(micro)`` as each micro-batch's backward callback,
    in micro-batch order, then :meth:`finish`."""

    def __init__(self, comm: Comm, net, accumulate: int = 1, bucket_bytes: int = BUCKET_BYTES):
        self.comm, self.accumulate = comm, accumulate
        self.xp = net.backend.xp
        self.grads = net.flat_grads
        self.ranges = parameter_ranges(net)
        itemsize = np.dtype(self.grads.dtype).itemsize
        self.buckets = plan_buckets(self.ranges, max(1, bucket_bytes // itemsize))
        self._buckets_after: dict[int, list[Bucket]] = {}
        for b in self.buckets:
            self._buckets_after.setdefault(b.ready_after, []).append(b)
        self.contributions = comm.size * accumulate
        self.sum = net.backend.zeros(self.grads.shape) if accumulate > 1 else self.grads
        self._pending: list = []

    def after_node(self, micro: int) -> Callable[[int], None]:
        """The backward callback of micro-batch ``micro`` (0 … accumulate − 1)."""
        if not 0 <= micro < self.accumulate:
            raise ValueError(f"micro-batch {micro} of {self.accumulate}")
        last = micro == self.accumulate - 1
        reduce = last and self.comm.size > 1

        def done(k: int) -> None:
            if self.accumulate > 1:
                for start, stop in self.ranges.get(k, ()):
                    if micro == 0:
                        self.sum[start:stop] = self.grads[start:stop]
                    else:
                        part = self.sum[start:stop]
                        self.xp.add(part, self.grads[start:stop], out=part)
            if reduce:
                for b in self._buckets_after.get(k, ()):
                    started = self.comm.allreduce_start(self.sum[b.start:b.stop])
                    if started is not None:
                        self._pending.append(started)
                if self._pending:
                    self.comm.poll(self._pending)

        return done

    def finish(self) -> None:
        """Wait for the sums; leave the mean gradient in ``flat_grads``."""
        pending, self._pending = self._pending, []
        self.comm.wait(pending)
        if self.contributions > 1:
            self.xp.multiply(self.sum, np.float32(1.0 / self.contributions), out=self.grads)


__all__ = ["GradientReduction", "Bucket", "plan_buckets", "parameter_ranges", "BUCKET_BYTES"]
