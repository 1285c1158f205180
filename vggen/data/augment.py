"""Augmentation (random crops and flips) and mini-batching of a Dataset."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vggen.data.datasets import Dataset
from vggen.errors import VggenError


def augment(
    images: np.ndarray, rng: np.random.Generator, pad: int = 4, flip: bool = True
) -> np.ndarray:
    """Random crop from a zero-padded image plus random horizontal flip.

    Images are normalised, so zero padding is the mean colour rather than
    black. Crop and flip are folded into one fancy-indexing gather, which
    returns a fresh C-contiguous array and never writes to the input.
    """
    if images.ndim != 4:
        raise ValueError(f"augment expects (N, C, H, W) images, got shape {images.shape}")
    return apply_crops(images, draw_crops(len(images), rng, pad, flip))


@dataclass(frozen=True)
class Crops:
    """The random crops (and flips) of ``len(top)`` images, drawn before any image is read,
    so that a data-parallel rank can draw those of the whole global batch and apply its part."""

    pad: int
    top: np.ndarray             # (N,) first padded row of each crop
    left: np.ndarray            # (N,) first padded column
    mirrored: np.ndarray | None  # (N,) bool, None when flips are off

    def __getitem__(self, part: slice) -> "Crops":
        return Crops(self.pad, self.top[part], self.left[part],
                     None if self.mirrored is None else self.mirrored[part])


def draw_crops(n: int, rng: np.random.Generator, pad: int = 4, flip: bool = True) -> Crops:
    """The crops of :func:`augment` for ``n`` images, drawn from ``rng`` in its order."""
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    top = rng.integers(0, 2 * pad + 1, size=n)
    left = rng.integers(0, 2 * pad + 1, size=n)
    mirrored = rng.random(n) < 0.5 if flip else None
    return Crops(pad, top, left, mirrored)


def apply_crops(images: np.ndarray, crops: Crops) -> np.ndarray:
    """``images`` cropped (and flipped) as ``crops`` says, one per image."""
    n, c, h, w = images.shape
    if len(crops.top) != n:
        raise ValueError(f"{len(crops.top)} crops for {n} images")
    pad = crops.pad
    padded = np.pad(images.astype(np.float32, copy=False), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    rows = crops.top[:, None] + np.arange(h)  # (N, H)
    cols = crops.left[:, None] + np.arange(w)  # (N, W)
    if crops.mirrored is not None:
        cols = np.where(crops.mirrored[:, None], cols[:, ::-1], cols)
    return padded[
        np.arange(n)[:, None, None, None],
        np.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def batches(
    ds: Dataset, batch_size: int, rng: np.random.Generator | None, drop_last: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (images, labels) mini-batches, in a fresh random order if rng is given.

    Arguments are checked here rather than on first ``next()`` so a bad
    ``--batch-size`` fails immediately with a clear message.
    """
    n = len(ds)
    if n == 0:
        raise VggenError(f"dataset {ds.name} is empty")
    if batch_size <= 0:
        raise VggenError(
            f"batch size must be positive, got {batch_size} (dataset {ds.name} has {n} samples)"
        )
    if drop_last and batch_size > n:
        raise VggenError(
            f"batch size {batch_size} is larger than dataset {ds.name} ({n} samples), "
            "so dropping the incomplete last batch would leave nothing"
        )
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield ds.images[idx], ds.labels[idx]

    return generate()
