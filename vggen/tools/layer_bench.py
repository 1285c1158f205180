"""``vggen bench --layer NAME``: how one zoo layer's forward and backward time
grows with its size.

The layer (a name of :data:`vggen.frontend.zoo.ZOO`) is compiled once with
``vggen.compile`` and timed at a ladder of sizes whose element count doubles
from rung to rung (C·H·W for a normalisation); the backward's time per
element then shows whether its work is linear (a flat column) or not (a
column that doubles with it).  Sizes that the layer's input shapes give are
read from :data:`SIZE_LADDER`; the batch stays fixed.  Each time is the
fastest of several runs, the figure least disturbed by other work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from vggen.errors import VggenError

# per rung: the input shapes' sizes (B, C, H, W fixed by the layer's first input's rank)
SIZE_LADDER = [(8, 8, 16, 16), (8, 16, 16, 16), (8, 16, 32, 16), (8, 16, 32, 32), (8, 32, 32, 32),
               (8, 32, 64, 32), (8, 32, 64, 64), (8, 64, 64, 64)]


@dataclass
class Rung:
    shape: tuple
    elements: int
    forward_ms: float
    backward_ms: float

    @property
    def backward_ns_per_element(self) -> float:
        return self.backward_ms * 1e6 / self.elements


def _best_ms(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs after a warm one: the least disturbed by other work."""
    fn()                                       # warm: first-touch pages, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def layer_scaling(name: str, target: str = "c", repeats: int = 7, rungs: int = len(SIZE_LADDER)) -> list[Rung]:
    from vggen import ops
    from vggen.frontend.zoo import ZOO

    if name not in ZOO:
        raise VggenError(f"--layer {name}: not a zoo layer: choose one of {', '.join(ZOO)}")
    entry = ZOO[name]
    op = ops.compile(entry.layer(), target, entry.sizes)
    rng = np.random.default_rng(0)
    first = op.layer.tensor(op.inputs[0])
    if first.rank != 4:
        raise VggenError(f"--layer {name}: the ladder sizes (B, C, H, W) inputs; {first.name} has rank {first.rank}")
    out = []
    for shape in SIZE_LADDER[:rungs]:
        inputs = {}
        for n in op.inputs:
            t = op.layer.tensor(n)
            dims = shape if t.rank == 4 else (shape[1],) * t.rank
            inputs[n] = rng.standard_normal(dims).astype(op.float_dtype)
        computed = op.forward(**inputs)
        seeds = {s: rng.standard_normal(computed[s[2:]].shape).astype(op.float_dtype) for s in op.seeds}
        given = {n: (inputs | computed)[n] for n in op.backward_inputs if n not in seeds}
        forward_ms = _best_ms(lambda: op.forward(**inputs), repeats)
        # the first input too, for its shape (a pooling's H and W)
        backward_args = {op.inputs[0]: inputs[op.inputs[0]], **given, **seeds}
        backward_ms = _best_ms(lambda: op.backward(**backward_args), repeats)
        out.append(Rung(shape, int(np.prod(shape)), forward_ms, backward_ms))
    return out


def format_scaling(name: str, rungs: list[Rung]) -> str:
    lines = [f"{name}: time against size (fastest of 7 runs; a flat ns/element column = linear work)",
             f"{'input shape':<20}{'elements':>10}{'forward ms':>12}{'backward ms':>13}{'backward ns/elem':>18}"]
    for r in rungs:
        lines.append(f"{str(r.shape):<20}{r.elements:>10}{r.forward_ms:>12.3f}{r.backward_ms:>13.3f}"
                     f"{r.backward_ns_per_element:>18.2f}")
    return "\n".join(lines)


__all__ = ["layer_scaling", "format_scaling", "Rung", "SIZE_LADDER"]
