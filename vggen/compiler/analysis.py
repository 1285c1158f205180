"""Target-neutral analyses of a lowered kernel that the targets' schedules build on.

How its work is bound (``reduction_bound``), which loop is contiguous for most
accesses (``contiguous_loop``), which range guards hoist out of a loop
(``split_region``), and whether a contraction is a matrix product
(``split_product``).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from vggen.compiler.ir import Loop, Reduction, Region
from vggen.compiler.symbolic import conjuncts, nonneg, unit_coeff_last


def reduction_bound(parallel: list[Loop], reductions: list[Reduction]) -> bool:
    """Whether the run-time reduction dims are at least as many as the run-time
    output dims: the work per output element outweighs the parallelism across
    elements (BN statistics, ∂L/∂γ, conv ∂L/∂w over b,i,j, softmax rows)."""
    n_par = sum(not lp.constant for lp in parallel)
    n_red = max([sum(not lp.constant for lp in r.loops) for r in reductions if r.loops] or [0])
    return bool(n_red) and n_red >= n_par


def contiguous_loop(parallel: list[Loop], r: Reduction, store: sp.Indexed) -> tuple[str, Loop]:
    """The loop of a contraction along which most accesses (the output's
    included) are contiguous: ("row", the last output loop) or ("reduce", one
    of ``r``'s loops); on a tie the output loop, then the first reduction loop."""
    accesses = sorted(r.body.atoms(sp.Indexed), key=sp.default_sort_key)
    cands = []
    if len(parallel) >= 2 and not parallel[-1].constant:
        v = parallel[-1].var
        cands.append((sum(unit_coeff_last(a, v) for a in accesses + [store]), 1, "row", parallel[-1]))
    for lp in r.loops:
        if not lp.constant:
            cands.append((sum(unit_coeff_last(a, lp.var) for a in accesses), 0, "reduce", lp))
    if not cands:                                          # every loop constant: reduce along the last
        cands.append((0, 0, "reduce", r.loops[-1]))
    _, _, mode, loop = max(cands, key=lambda c: (c[0], c[1]))
    return mode, loop


def split_region(body, hoist: set, var, loop: Loop | None, sizes: set) -> Region | None:
    """Hoist the range guards of ``body`` that read only ``hoist`` loops (and,
    with unit coefficient, ``var``) out of the loop over ``var``."""
    rels = sorted((r for r in body.atoms(sp.core.relational.Relational) if nonneg(r) is not None),
                  key=sp.default_sort_key)
    outer, lowers, uppers, hoisted = [], [], [], []
    for rel in rels:
        d = nonneg(rel)
        free = d.free_symbols - sizes
        if var is None or var not in free:
            if free <= hoist:
                outer.append(rel)
                hoisted.append(rel)
            continue
        coeff = d.coeff(var)
        rest = sp.expand(d - coeff * var)
        if coeff in (1, -1) and not rest.has(var) and (rest.free_symbols - sizes) <= hoist:
            (lowers if coeff == 1 else uppers).append(-rest if coeff == 1 else rest)
            hoisted.append(rel)
    if not hoisted:
        return None
    interior = body.xreplace({rel: sp.true for rel in hoisted})
    first = last = None
    if var is not None:
        first = sp.Max(loop.first, *lowers)
        last = sp.Min(loop.last, *uppers)
    return Region(var, sp.And(*outer), first, last, hoisted, interior)


def guarded_factors(e, conds: list, factors: list) -> bool:
    """Split a summand into range-guard conjuncts and product factors
    (``Piecewise((X, c), (0, True))·Y`` is X·Y under c); False where it is not
    such a guarded product."""
    if isinstance(e, sp.Piecewise):
        if len(e.args) != 2 or e.args[1].cond is not sp.true or e.args[1].expr != 0:
            return False
        conds += conjuncts(e.args[0].cond)
        return guarded_factors(e.args[0].expr, conds, factors)
    if isinstance(e, sp.Mul):
        return all(guarded_factors(f, conds, factors) for f in e.args)
    factors.append(e)
    return True


@dataclass
class ProductSplit:
    """A contraction Σ_k c·A[m, k]·B[k, n] under range guards, split into its
    matrix-product view (shared by the C GEMM and the CUDA tiled schedules)."""

    m: list            # output loops only A reads
    n: list            # output loops only B reads; B holds the output's last index
    k: list            # the summed loops
    a_read: sp.Indexed
    b_read: sp.Indexed
    coeff: sp.Expr     # constant factor, folded into A
    a: sp.Expr         # c·A with A's guards
    b: sp.Expr         # B with B's guards
    a_guarded: bool
    b_guarded: bool


def split_product(parallel: list, term: sp.Expr, limits: list) -> ProductSplit | None:
    """The summand ``term`` over ``limits`` as a matrix product, or None where it
    is not one: not a guarded product of two tensor reads and a constant, an
    output index both operands read (a batch index) or neither, a guard that
    reads tensor data or both operands' loops."""
    conds, factors = [], []
    if not limits or not guarded_factors(term, conds, factors) or any(c.atoms(sp.Indexed) for c in conds):
        return None
    loops = {lp.var for lp in parallel} | {lp.var for lp in limits}
    reads = [f for f in factors if isinstance(f, sp.Indexed)]
    coeff = [f for f in factors if not isinstance(f, sp.Indexed)]
    if len(reads) != 2 or any(f.free_symbols & loops or f.atoms(sp.Indexed) for f in coeff):
        return None
    used = [set().union(*[sp.sympify(ix).free_symbols for ix in a.indices]) & loops for a in reads]
    out = [lp.var for lp in parallel]
    if not out or used[0] & used[1] & set(out) or not set(out) <= used[0] | used[1]:
        return None
    second = 0 if out[-1] in used[0] else 1            # B holds the output's last (contiguous) index
    a_read, b_read = reads[1 - second], reads[second]
    m = [lp for lp in parallel if lp.var in used[1 - second]]
    n = [lp for lp in parallel if lp.var in used[second]]
    k = list(limits)
    if not m or not n:
        return None
    mk, nk = {lp.var for lp in m + k}, {lp.var for lp in n + k}
    a_conds, b_conds = [], []
    for c in conds:
        free = c.free_symbols & loops
        if free <= mk:
            a_conds.append(c)
        elif free <= nk:
            b_conds.append(c)
        else:
            return None
    c = sp.Mul(*coeff)
    a = c * a_read
    a = sp.Piecewise((a, sp.And(*a_conds)), (0, True)) if a_conds else a
    b = sp.Piecewise((b_read, sp.And(*b_conds)), (0, True)) if b_conds else b_read
    return ProductSplit(m, n, k, a_read, b_read, c, a, b, bool(a_conds), bool(b_conds))
