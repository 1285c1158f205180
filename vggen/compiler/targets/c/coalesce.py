"""Loop coalescing (C target): two innermost loops that walk a contiguous plane become one.

An activation's row is its last dimension, W pixels; deep in the network W
is 2 to 8, too short for the vector loop of an AVX-512 machine (16 floats),
so a kernel looping ``for i < H: for j < W`` runs its vector loop mostly in
its scalar remainder.  Where every access that uses ``i`` and ``j`` ends in
exactly ``[…, i, j]`` on a tensor whose last two dimensions are the loops'
full extents (first index 0), the pair is the plane's flat index
``ij = W·i + j``: one loop of H·W iterations with the accesses rewritten to
``[…, 0, ij]`` (the same address).  Applied to elementwise kernels' output
loops and to reduction loops; contractions keep their own schedules, and the
CUDA kernels flatten their whole domain anyway.
"""

from __future__ import annotations

import dataclasses

import sympy as sp

from vggen.compiler.ir import Kernel, KernelClass, Loop


def _plane_access(acc: sp.Indexed, i, j, ei, ej, tensors) -> bool:
    t = tensors[str(acc.base.label)]
    idx = tuple(acc.indices)
    return (len(idx) >= 2 and idx[-2:] == (i, j)
            and not any(s.has(i) or s.has(j) for s in map(sp.sympify, idx[:-2]))
            and sp.expand(t.shape[-2] - ei) == 0 and sp.expand(t.shape[-1] - ej) == 0
            and t.lower[-2] == 0 and t.lower[-1] == 0)


def _rewrite(exprs: list, pair: list[Loop], tensors) -> tuple[list, Loop] | None:
    """``exprs`` with every access to the plane of ``pair`` rewritten onto one
    flat index, and that index's loop; None where an expression uses the pair
    otherwise (a guard, a shifted read, another layout)."""
    li, lj = pair
    if li.first != 0 or lj.first != 0:
        return None
    i, j = li.var, lj.var
    ij = sp.Symbol(f"{i.name}{j.name}", integer=True)
    out = []
    for e in exprs:
        reps = {a: a.base[tuple(a.indices[:-2]) + (sp.Integer(0), ij)]
                for a in e.atoms(sp.Indexed) if _plane_access(a, i, j, li.extent, lj.extent, tensors)}
        new = e.xreplace(reps)
        if new.has(i) or new.has(j):
            return None
        out.append(new)
    return out, Loop(ij, sp.Integer(0), sp.expand(li.extent * lj.extent - 1))


def coalesce_rows(kernel: Kernel) -> Kernel:
    """``kernel`` with its innermost plane loops coalesced where that is exact
    (see the module docstring); the kernel itself where it is not."""
    if kernel.cls is KernelClass.ELEMENTWISE and len(kernel.parallel) >= 2:
        stores = [s.store for s in kernel.stages]
        values = [s.value for s in kernel.stages]
        got = _rewrite(stores + values, kernel.parallel[-2:], kernel.tensors)
        if got is None:
            return kernel
        exprs, loop = got
        n = len(stores)
        stages = [dataclasses.replace(s, lhs=tuple(st.indices), value=v)
                  for s, st, v in zip(kernel.stages, exprs[:n], exprs[n:])]
        parallel = kernel.parallel[:-2] + [loop]
        return dataclasses.replace(kernel, parallel=parallel, stages=stages)
    if kernel.cls is KernelClass.REDUCTION:
        stages = []
        for s in kernel.stages:
            reds = []
            for r in s.reductions:
                got = (_rewrite([r.body], r.loops[-2:], kernel.tensors)
                       if r.op in ("sum", "max") and r.body is not None and len(r.loops) >= 2 else None)
                if got is None:
                    reds.append(r)
                else:
                    (body,), loop = got
                    reds.append(dataclasses.replace(r, body=body, loops=r.loops[:-2] + [loop]))
            stages.append(dataclasses.replace(s, reductions=reds))
        return dataclasses.replace(kernel, stages=stages)
    return kernel


__all__ = ["coalesce_rows"]
