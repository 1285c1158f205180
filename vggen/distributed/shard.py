"""Which images a rank reads: the global batch split so that the data does not depend on N.

A step's global batch is ``ranks × accumulate × batch`` images, the next
slice of the epoch's one random order.  It is cut into ``ranks × accumulate``
micro-batches of ``batch`` images, numbered in reading order; rank r trains on
micro-batches ``r·accumulate … r·accumulate + accumulate − 1``.  Every rank
draws from the run's one generator exactly what one process would for the
whole global batch (the order, every image's crop and flip, the dropout
seeds), and applies its own part: the generators stay equal on every rank,
and a run on N ranks reads the images, crops and masks that one process with
``--accumulate N`` reads.

Dropout: a step of one micro-batch draws its masks from the run's generator
(as a single process always has); a step of several gives micro-batch j a
generator of its own, seeded by the j-th of one draw of seeds per step, so
that a rank need not draw the other ranks' masks to keep its generator in
step with theirs.

Evaluation: the test set's batches, in order, dealt round-robin (batch i to
rank i mod N); the per-batch sums are gathered and added in batch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vggen.data.augment import Crops, apply_crops


@dataclass(frozen=True)
class Split:
    """How one step's global batch is shared out."""

    rank: int
    ranks: int
    accumulate: int
    batch: int                       # images per micro-batch (--batch-size)

    @property
    def micro_batches(self) -> int:
        return self.ranks * self.accumulate

    @property
    def global_batch(self) -> int:
        return self.batch * self.micro_batches

    def mine(self) -> range:
        """The global indices of this rank's micro-batches."""
        return range(self.rank * self.accumulate, (self.rank + 1) * self.accumulate)

    def part(self, micro: int) -> slice:
        """Micro-batch ``micro``'s images within the global batch."""
        return slice(micro * self.batch, (micro + 1) * self.batch)


@dataclass
class MicroBatch:
    images: np.ndarray
    labels: np.ndarray
    rng: np.random.Generator | None  # the dropout masks' generator (None: no dropout)


def dropout_generators(rng: np.random.Generator, split: Split) -> dict[int, np.random.Generator]:
    """The masks' generator of each of this rank's micro-batches (see the module docstring)."""
    if split.micro_batches == 1:
        return {0: rng}
    seeds = rng.integers(0, 2 ** 63, size=split.micro_batches)
    return {j: np.random.default_rng(int(seeds[j])) for j in split.mine()}


def my_micro_batches(images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                     crops: Crops | None, generators: dict | None, split: Split) -> list[MicroBatch]:
    """This rank's micro-batches of the global batch ``indices`` (with the crops of
    the whole global batch, and :func:`dropout_generators`), in order."""
    out = []
    for j in split.mine():
        part = split.part(j)
        chosen = indices[part]
        mine = images[chosen]
        if crops is not None:
            mine = apply_crops(mine, crops[part])
        out.append(MicroBatch(mine, labels[chosen], generators[j] if generators else None))
    return out


def my_test_batches(n: int, batch: int, rank: int, ranks: int) -> list[tuple[int, slice]]:
    """(batch number, images) of the test batches this rank evaluates."""
    count = -(-n // batch)
    return [(i, slice(i * batch, min(n, (i + 1) * batch))) for i in range(rank, count, ranks)]


__all__ = ["Split", "MicroBatch", "dropout_generators", "my_micro_batches", "my_test_batches"]
