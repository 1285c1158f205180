"""CUDA schedule of a kernel that is not run as a tiled product: its threads' mapping.

``mode`` is "thread" (one thread per output element, threadIdx.x along the
last dim) or "block" (one block per output element, a shared-memory tree
reduction over the reduction domain); ``region`` is a thread-mapped
contraction's per-thread interior test; ``split``: a block reduction in one
pass over the data, so that several blocks may share one output's reduction
domain, the last to finish combining their partials
(``cuda/reduction.cu.j2``): BN's ∂L/∂γ, ∂L/∂β have a few dozen outputs of
tens of thousands of terms each.
"""

from __future__ import annotations

from dataclasses import dataclass

from vggen.compiler.analysis import reduction_bound, split_region
from vggen.compiler.ir import Kernel, KernelClass, Region
from vggen.compiler.symbolic import size_symbols

# the classes whose reductions may take a block per output element
_BLOCK_CLASSES = (KernelClass.REDUCTION, KernelClass.ROW_SOFTMAX, KernelClass.CONTRACTION)


@dataclass
class Schedule:
    """How a kernel's threads map onto its work (see the module docstring)."""

    mode: str                      # "thread" or "block"
    region: Region | None = None
    split: bool = False


def schedule(kernel: Kernel) -> Schedule:
    """Block per output element where the kernel is reduction-bound
    (``analysis.reduction_bound``: work per element beats parallelism across
    elements), else one thread per element."""
    block = kernel.cls in _BLOCK_CLASSES and reduction_bound(kernel.parallel, kernel.reductions)
    mode = "block" if block else "thread"
    region = None
    if kernel.cls is KernelClass.CONTRACTION and mode == "thread":
        (r,) = kernel.reductions
        region = split_region(r.body, {lp.var for lp in kernel.parallel}, None, None, size_symbols(kernel.tensors))
    split = (kernel.cls is KernelClass.REDUCTION and mode == "block"
             and len(kernel.passes) == 1 and all(r.op in ("sum", "max") for r in kernel.reductions))
    return Schedule(mode, region, split)
