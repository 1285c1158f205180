"""Fuse: consecutive stages of a layer that share the parallel loop nest go into one kernel.

A later stage reads an earlier one's result from a register
(``Stage.local``).  ArgMax + its selection equation fuse into a
``window_argmax`` kernel whose selection is the maximum itself.
"""

from __future__ import annotations

import dataclasses

import sympy as sp

from vggen.compiler.analysis import reduction_bound
from vggen.compiler.ir import Loop, Reduction, Stage
from vggen.frontend.lang import Role


def output_loops(stage: Stage) -> list[Loop]:
    return [Loop(v, first, last) for v, (first, last) in zip(stage.lhs, stage.tensor.index_ranges())]


def stage_kind(stage: Stage) -> str:
    ops = {r.op for r in stage.reductions}
    if "argmax" in ops:
        return "argmax"
    if len(stage.reductions) == 1 and stage.reductions[0].contraction:
        return "contract"
    return "reduce" if ops else "map"

def try_fuse(group: list[Stage], nxt: Stage) -> Stage | None:
    """``nxt`` rewritten into ``group``'s loop nest, or None where it may not join."""
    head = group[0]
    kinds = [stage_kind(s) for s in group]
    kind = stage_kind(nxt)
    # maps join anything but a contraction; reductions join a group that began with one
    if "contract" in kinds or kind in ("contract", "argmax"):
        return None
    if kind == "reduce" and kinds[0] != "reduce":
        return None
    ours = output_loops(head)
    theirs = output_loops(nxt)
    if len(ours) != len(theirs) or any(sp.expand(a.first - b.first) != 0 or sp.expand(a.last - b.last) != 0
                                       for a, b in zip(ours, theirs)):
        return None
    # a reduction joins only a group whose work is bound the same way (by its
    # reductions or by its outputs): targets map the two kinds differently
    if kind == "reduce" and reduction_bound(ours, [r for s in group for r in s.reductions]) \
            != reduction_bound(ours, nxt.reductions):
        return None
    rename = dict(zip(nxt.lhs, head.lhs))
    bound = {lp.var for r in nxt.reductions for lp in r.loops}
    if bound & set(head.lhs):
        return None
    written = {s.tensor.name: s for s in group}
    if nxt.tensor.name in written:
        return None
    local = {}
    for s in group:
        local[s.store] = s.local

    def move(e):
        e = e.xreplace(rename).xreplace(local)
        for a in e.atoms(sp.Indexed):
            if str(a.base.label) in written:
                raise _NoFusion
        return e

    try:
        reds = [dataclasses.replace(r, body=move(r.body) if r.body is not None else None,
                                    positions=[(p, move(b)) for p, b in r.positions])
                for r in nxt.reductions]
        value = move(nxt.value)
    except _NoFusion:
        return None
    # the group must not read what nxt writes (it would read it before it is written),
    # unless nxt updates state in place and the group reads only the element that
    # the same iteration writes, before writing it
    for s in group:
        for e in [s.value] + [r.body for r in s.reductions if r.body is not None]:
            if any(str(a.base.label) == nxt.tensor.name
                   and not (nxt.tensor.role is Role.STATE and tuple(a.indices) == tuple(head.lhs))
                   for a in e.atoms(sp.Indexed)):
                return None
    for s in group:
        for r in s.reductions:
            if r.op == "argmax":
                value = select_by_argmax(value, r, s.local)
    return Stage(nxt.equation, nxt.tensor, head.lhs, reds, value, nxt.local)


class _NoFusion(Exception):
    pass


def select_by_argmax(value, r: Reduction, position: sp.Symbol):
    """Σ_k δ(k, position)·body_k over the argmax's own window is its maximum."""
    got = {}
    for term in sp.Add.make_args(value):
        deltas = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.KroneckerDelta) and f.has(position)]
        if len(deltas) != 1 or position not in deltas[0].args:
            return value
        other = [a for a in deltas[0].args if a != position]
        if len(other) != 1 or not other[0].is_Integer:
            return value
        got[int(other[0])] = term / deltas[0]
    if got == dict(r.positions):
        return r.best
    return value
