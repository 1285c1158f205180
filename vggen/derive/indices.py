"""Index arithmetic simplified under the ranges its indices run over.

Inverting accesses through floor and Mod (a per-group statistic
``μ[b, ⌊c/CG⌋]`` read by every channel of its group) leaves subscripts such as
``⌊(CG·⌊c/CG⌋ + k)/CG⌋`` with 0 ≤ k < CG, or ``CG·⌊c/CG⌋ + c mod CG``.  Both
are plain (``⌊c/CG⌋`` and ``c``), but only given the ranges; until they are
written so, equal reads do not compare equal: terms that cancel exactly stay
apart, and a factor constant over a sum is not pulled out of it.

:func:`simplify_indices` rewrites every subscript (and floor/Mod node) of an
expression, descending into sums with their limits added to the ranges:

* ``⌊(s·A + N)/s⌋ = A + ⌊N/s⌋`` for an integer A (SymPy does this once the
  argument is expanded), and ``⌊N/s⌋ = 0``, ``N mod s = N`` where
  ``0 ≤ N ≤ s − 1`` is proved;
* ``s·⌊N/s⌋ + (N mod s) = N``.
"""

from __future__ import annotations

import sympy as sp

from vggen.frontend.lang import proves_nonneg, quotient


def _within_one_period(node, ranges: dict) -> bool:
    """0 ≤ N ≤ s − 1 for floor(N/s) or Mod(N, s), proved from ``ranges``."""
    if isinstance(node, sp.floor):
        q = quotient(node.args[0])
        if q is None:
            return False
        n, s = q
    else:
        n, s = node.args
    return proves_nonneg(n, ranges) and proves_nonneg(s - 1 - n, ranges)


def _recombine(e: sp.Expr) -> sp.Expr:
    """s·⌊N/s⌋ + (N mod s) → N, wherever both terms stand in one sum."""
    for mod in sorted(e.atoms(sp.Mod), key=sp.default_sort_key):
        n, s = mod.args
        whole = sp.expand(s * sp.floor(n / s))
        cand = sp.expand(e - whole - mod + n)
        if len(cand.atoms(sp.floor, sp.Mod)) < len(e.atoms(sp.floor, sp.Mod)):
            e = cand
    return e


def simplify_index(e: sp.Expr, ranges: dict) -> sp.Expr:
    """One subscript, simplified under ``ranges`` (index → inclusive (lo, hi))."""
    e = sp.expand(e)
    if not e.has(sp.floor, sp.Mod):
        return e
    for _ in range(8):                       # each round removes a node; the nesting is shallow
        before = e
        for node in sorted(e.atoms(sp.floor, sp.Mod), key=sp.default_sort_key):
            if _within_one_period(node, ranges):
                e = sp.expand(e.xreplace({node: sp.Integer(0) if isinstance(node, sp.floor)
                                          else node.args[0]}))
        e = _recombine(e)
        if e == before:
            break
    return e


def simplify_indices(expr: sp.Expr, ranges: dict) -> sp.Expr:
    """Every subscript of ``expr`` simplified; a sum's own indices are
    bounded by its limits inside it."""
    if not isinstance(expr, sp.Basic) or not expr.has(sp.floor, sp.Mod):
        return expr
    if isinstance(expr, sp.Indexed):
        return expr.base[tuple(simplify_index(i, ranges) for i in expr.indices)]
    if isinstance(expr, sp.Sum):
        inner = dict(ranges)
        inner.update({v: (lo, hi) for v, lo, hi in expr.limits})
        return sp.Sum(simplify_indices(expr.function, inner), *expr.limits)
    if isinstance(expr, (sp.floor, sp.Mod)):
        return simplify_index(expr, ranges)
    return expr.func(*[simplify_indices(a, ranges) for a in expr.args])


__all__ = ["simplify_index", "simplify_indices"]
