"""Symbolic facts about index arithmetic that every stage of the compiler asks.

Offsets (how a tensor access flattens to one row-major element offset),
ranges (the inclusive interval an index expression spans over loop
ranges), proofs (whether ``d ≥ 0`` holds everywhere there), and the shapes
of index expressions and range guards.  Target-neutral: the printers, the
lowering passes and the targets' schedules share these, so that each fact
is decided in one place.  Ranges and proofs are the front end's own
(``vggen.frontend.lang``: ``affine_range``, ``proves_nonneg``): the layer
checks, the derivation and the compiler share one range analysis.
"""

from __future__ import annotations

import sympy as sp

from vggen.frontend.lang import (
    ArgMax,
    affine_range,
    integer_index,
    nonneg,
    proves_nonneg,
)


def row_major_offset(indices, t) -> sp.Expr:
    """The row-major element offset of ``t[indices]``, the tensor's first index
    per dimension subtracted, as written (unexpanded: how the printers show it)."""
    flat = sp.Integer(0)
    for k, (ix, lo, n) in enumerate(zip(indices, t.lower, t.shape)):
        flat = (ix - lo) if k == 0 else flat * n + (ix - lo)
    return flat


def flat_offset(acc: sp.Indexed, t) -> sp.Expr:
    """The row-major element offset an access reads, expanded (for comparing
    coefficients)."""
    return sp.expand(row_major_offset(acc.indices, t))


def size_symbols(tensors: dict) -> set:
    """Every symbol the tensors' shapes and first indices use: the run-time sizes."""
    out = set()
    for t in tensors.values():
        for e in t.shape + t.lower:
            out |= e.free_symbols
    return out


def affine_index(e, loop_vars: set) -> bool:
    """Affine in the loop indices, where a term may be a multiple of floor/Mod
    of such an expression by a positive constant or size (⌊(i + 1)/2⌋ − p,
    2·p + (i + 1) mod 2)."""
    e = sp.sympify(e)
    if isinstance(e, (sp.floor, sp.Mod)):
        if isinstance(e, sp.floor):
            arg, den = sp.fraction(sp.together(e.args[0]))
        else:
            arg, den = e.args
        return bool(den.is_positive and den.is_integer) and not den.free_symbols & loop_vars \
            and affine_index(arg, loop_vars)
    nodes = {n for n in e.atoms(sp.floor, sp.Mod) if n.free_symbols & loop_vars}
    outer = {n for n in nodes if not any(m != n and m.has(n) for m in nodes)}
    if not all(affine_index(n, loop_vars) for n in outer):
        return False
    # each floor/Mod term is one more index to be affine in
    subs = {n: sp.Dummy("t", integer=True) for n in outer}
    e, loop_vars = sp.expand(e.xreplace(subs)), set(loop_vars) | set(subs.values())
    if not e.is_polynomial(*loop_vars):
        return False
    poly = sp.Poly(e, *loop_vars) if loop_vars else None
    return poly is None or poly.total_degree() <= 1


def unit_coeff_last(acc: sp.Indexed, var) -> bool:
    """Whether ``acc``'s last (contiguous) index steps by ±1 with ``var``."""
    last = sp.expand(acc.indices[-1])
    return not last.atoms(sp.floor, sp.Mod) and last.is_polynomial(var) and sp.diff(last, var) in (1, -1)


def int_valued(e, tensors: dict) -> bool:
    """Whether ``e`` evaluates to an integer in C (ints, index arithmetic, int tensors)."""
    if isinstance(e, sp.Indexed):
        return tensors[str(e.base.label)].dtype == "int"
    if isinstance(e, sp.Symbol):
        return bool(e.is_integer)
    if e.is_Number:
        return bool(e.is_Integer)
    if isinstance(e, (sp.KroneckerDelta, sp.core.relational.Relational, sp.And, sp.Or, sp.Not)) \
            or e in (sp.true, sp.false):
        return True
    if isinstance(e, (sp.floor, sp.Mod)):
        return all(int_valued(a, tensors) for a in e.args) or isinstance(e, sp.floor)
    if isinstance(e, sp.Piecewise):
        return all(int_valued(v, tensors) for v, _ in e.args)
    if isinstance(e, sp.Pow):
        return int_valued(e.base, tensors) and e.exp.is_Integer and e.exp >= 0
    if isinstance(e, (sp.Add, sp.Mul, sp.Max, sp.Min, sp.Abs)):
        return all(int_valued(a, tensors) for a in e.args)
    if isinstance(e, ArgMax):
        return True
    return False


def is_index_relational(r) -> bool:
    """A comparison of index arithmetic only (no tensor data, integer symbols)."""
    return not r.atoms(sp.Indexed) and all(s.is_integer for s in r.free_symbols)


# the front end's range analysis, under the name the compiler's passes use
value_range = affine_range


def proved(d, ranges, facts=()) -> bool:
    """``d >= 0`` holds for every value of the loops in ``ranges`` (where each
    fact f ≥ 0 of ``facts`` holds)."""
    return d is not None and proves_nonneg(d, ranges, facts)


def conjuncts(cond) -> list:
    """The terms of a conjunction (the condition itself where it is not one)."""
    return list(cond.args) if isinstance(cond, sp.And) else [cond]


def range_guards(exprs) -> list:
    """Every range guard (integer relational) in ``exprs``, in a fixed order."""
    rels = set()
    for e in exprs:
        rels |= {r for r in e.atoms(sp.core.relational.Relational) if nonneg(r) is not None}
    return sorted(rels, key=sp.default_sort_key)


def guard_text(e) -> str:
    """A guarded element ``Piecewise((v, c), (0, True))`` in words, for comments."""
    if isinstance(e, sp.Piecewise):
        val, cond = e.args[0]
        conds = ", ".join(f"{sp.expand(nonneg(c))} >= 0" if nonneg(c) is not None else str(c)
                          for c in conjuncts(cond))
        return f"{val} where {conds}, else 0"
    return str(e)


__all__ = ["row_major_offset", "flat_offset", "size_symbols", "affine_index", "unit_coeff_last",
           "int_valued", "is_index_relational", "nonneg", "value_range", "proved", "conjuncts",
           "range_guards", "guard_text", "integer_index"]
