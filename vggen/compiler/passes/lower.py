"""Lower: one equation → one ``Stage``.

The left-hand indices become the parallel loops; each reduction node becomes
a ``Reduction`` whose run-time ranges are loops and whose constant window
(after specialisation) is unrolled into the body; reads of zero-outside
tensors become explicit range guards (``Piecewise``), dropped where the loop
ranges prove them.
"""

from __future__ import annotations

import itertools

import sympy as sp

from vggen.compiler.ir import Loop, Reduction, Stage
from vggen.compiler.passes.analyse import UNROLL_LIMIT, check_equation, constant_window
from vggen.compiler.symbolic import (
    affine_index,
    conjuncts,
    nonneg,
    proved,
    size_symbols,
)
from vggen.frontend.lang import REDUCTIONS, ArgMax, Equation, Layer, ReduceMax


def explicit_guards(e, ranges, tensors, known=frozenset()):
    """Zero-outside reads → Piecewise((read, in range), (0, True)); index
    conditions dropped where ``ranges`` prove them or an enclosing Piecewise
    branch already tests them (``known``: the d of its conditions d ≥ 0)."""
    if isinstance(e, sp.Indexed):
        t = tensors[str(e.base.label)]
        if not t.zero_outside:
            return e
        conds = []
        for ix, (first, last) in zip(e.indices, t.index_ranges()):
            for d in (sp.expand(ix - first), sp.expand(last - ix)):
                if d not in known and not proved(d, ranges):
                    conds.append(sp.Ge(d, 0))
        return sp.Piecewise((e, sp.And(*conds)), (0, True)) if conds else e
    if isinstance(e, sp.Piecewise):
        pairs = []
        for val, cond in e.args:
            cond = explicit_guards(cond, ranges, tensors, known)
            if cond is sp.false:
                continue
            inner = known | {d for d in map(nonneg, conjuncts(cond)) if d is not None}
            pairs.append((explicit_guards(val, ranges, tensors, inner), cond))
            if cond is sp.true:
                break
        return sp.Piecewise(*pairs)
    if isinstance(e, sp.core.relational.Relational):
        rel = e.func(*[explicit_guards(a, ranges, tensors, known) for a in e.args])
        d = nonneg(rel)
        return sp.true if d is not None and (d in known or proved(d, ranges)) else rel
    if not e.args or isinstance(e, sp.Symbol) or e.is_Number:
        return e
    return e.func(*[explicit_guards(a, ranges, tensors, known) for a in e.args])


def unroll(node, body=None) -> list[tuple[int, sp.Expr]]:
    """[(row-major position, body)] over every point of a constant window."""
    body = node.function if body is None else body
    lims = [(v, int(lo), int(hi)) for v, lo, hi in node.limits]
    out = []
    for pos, point in enumerate(itertools.product(*[range(lo, hi + 1) for _, lo, hi in lims])):
        out.append((pos, inline_windows(body.xreplace({v: sp.Integer(x) for (v, _, _), x in zip(lims, point)}))))
    return out


def inline_windows(e):
    """Replace Sum/ReduceMax over constant windows by their unrolled expansion
    (bottom-up, so a window inside a window unrolls too)."""
    def expand(n):
        terms = [b for _, b in unroll(n)]
        return sp.Add(*terms) if isinstance(n, sp.Sum) else sp.Max(*terms)
    return e.replace(lambda n: isinstance(n, (sp.Sum, ReduceMax)) and constant_window(n), expand)


def is_contraction(node, parallel: tuple, tensors: dict) -> bool:
    """Σ of (guarded) coefficient · A[f(…)] · B[g(…)], each operand missing some output index.

    The missing indices are what makes it a contraction (each operand element
    is reused across them, as in a matrix product); Σ A·B with both indexed by
    every output index (∂L/∂γ) is an ordinary reduction.
    """
    if not isinstance(node, sp.Sum):
        return False
    body = node.function
    while isinstance(body, sp.Piecewise) and len(body.args) == 2 and body.args[1].expr == 0:
        body = body.args[0].expr
    factors = sp.Mul.make_args(body)
    operands = [f for f in factors if isinstance(f, sp.Indexed)]
    rest = [f for f in factors if not isinstance(f, sp.Indexed)]
    if len(operands) != 2 or any(r.free_symbols - size_symbols(tensors) for r in rest):
        return False
    loop_vars = set(parallel) | set(node.variables)
    for op in operands:
        if tensors[str(op.base.label)].dtype != "float":
            return False
        if not all(affine_index(sp.sympify(ix), loop_vars) and not ix.atoms(sp.floor, sp.Mod)
                   for ix in op.indices):
            return False
        used = set().union(*[sp.sympify(ix).free_symbols for ix in op.indices])
        if set(parallel) <= used:
            return False
    return True


def rename_shadowing(rhs, outer: set):
    """A reduction index that reuses an output index's name (legal SymPy, e.g.
    ``g_x[w] = … / Sum(…, (w, 0, W - 1))``) gets a fresh name: in C they would
    be one variable."""
    taken = {s.name for s in rhs.free_symbols | outer}
    taken |= {v.name for n in rhs.atoms(*REDUCTIONS) for v in n.variables}

    def rename(node):
        subs = {}
        for v in node.variables:
            if v in outer:
                name = v.name
                while name in taken:
                    name += "2"
                taken.add(name)
                subs[v] = sp.Symbol(name, integer=True)
        return node.xreplace(subs)   # renames the limits and the body together

    return rhs.replace(lambda n: isinstance(n, REDUCTIONS) and set(n.variables) & outer, rename)


def lower_stage(eq: Equation, layer: Layer, subs: dict, tensors: dict) -> Stage:
    where = f"{eq.label + ' of ' if eq.label else ''}{eq.target} in {layer.name} ({eq})"
    rhs = rename_shadowing(eq.rhs.xreplace(subs), set(eq.lhs.indices) if isinstance(eq.lhs, sp.Indexed) else set())
    check_equation(eq, rhs, tensors, where)
    t = tensors[eq.target]
    lhs = tuple(eq.lhs.indices)
    par_ranges = dict(zip(lhs, t.index_ranges()))

    # top-level reduction nodes (nested ones were checked constant; they unroll inside)
    nodes = rhs.atoms(*REDUCTIONS)
    top = sorted((n for n in nodes if not any(m != n and m.has(n) for m in nodes)), key=sp.default_sort_key)
    reductions, replace = [], {}
    for k, node in enumerate(top):
        suffix = f"_{k}" if len(top) > 1 else ""
        if isinstance(node, ArgMax):
            acc = sp.Symbol(f"arg_{t.name}{suffix}", integer=True)
            best = sp.Symbol(f"best_{t.name}{suffix}", real=True)
            positions = [(pos, explicit_guards(b, par_ranges, tensors)) for pos, b in unroll(node)]
            reductions.append(Reduction("argmax", acc, [], positions=positions, best=best))
            replace[node] = acc
            continue
        if constant_window(node):
            replace[node] = inline_windows(node)
            continue
        op = "sum" if isinstance(node, sp.Sum) else "max"
        lims = list(node.limits)
        const = [lim for lim in lims if lim[1].is_Integer and lim[2].is_Integer]
        ext = 1
        for _, lo, hi in const:
            ext *= int(hi - lo + 1)
        unrolled = const if ext <= UNROLL_LIMIT else []
        loops = [Loop(v, lo, hi) for v, lo, hi in lims if (v, lo, hi) not in unrolled]
        body = node.function
        if unrolled:
            window = sp.Sum(body, *unrolled) if op == "sum" else ReduceMax(body, *unrolled)
            body = inline_windows(window)
        else:
            body = inline_windows(body)
        ranges = dict(par_ranges)
        ranges.update({lp.var: (lp.first, lp.last) for lp in loops})
        acc = sp.Symbol(f"acc_{t.name}{suffix}", real=True)
        red = Reduction(op, acc, loops, explicit_guards(body, ranges, tensors),
                        contraction=is_contraction(node, lhs, tensors))
        if red.contraction:
            red.limits = [Loop(v, lo, hi) for v, lo, hi in lims]
            ranges.update({lp.var: (lp.first, lp.last) for lp in red.limits})
            red.term = explicit_guards(inline_windows(node.function), ranges, tensors)
        reductions.append(red)
        replace[node] = acc
    value = explicit_guards(inline_windows(rhs.xreplace(replace)), par_ranges, tensors)
    local = sp.Symbol(f"v_{t.name}", integer=True) if t.dtype == "int" else sp.Symbol(f"v_{t.name}", real=True)
    return Stage(eq, t, lhs, reductions, value, local)
