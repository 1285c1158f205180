"""Order: a contraction's contiguous loop runs innermost.

Of the last output loop and the reduction's run-time loops, the one along
which most accesses are contiguous (``analysis.contiguous_loop``) becomes the
kernel's ``innermost`` loop; a reduction loop moves to the end of its
reduction's loops.  Every target iterates it innermost (C vectorises it).
"""

from __future__ import annotations

from vggen.compiler.analysis import contiguous_loop
from vggen.compiler.ir import KernelClass, Loop, Stage


def order_loops(cls: KernelClass, parallel: list[Loop], stages: list[Stage]) -> Loop | None:
    """The innermost loop of a contraction (its reduction reordered in place);
    None for the other classes, whose innermost loop is their last output loop."""
    if cls is not KernelClass.CONTRACTION:
        return None
    (r,) = [r for s in stages for r in s.reductions]
    mode, loop = contiguous_loop(parallel, r, stages[0].store)
    if mode == "reduce":
        r.loops = [lp for lp in r.loops if lp is not loop] + [loop]
    return loop
