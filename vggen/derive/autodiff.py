"""Reverse-mode derivation of a layer's backward equations, in gather form.

For a forward equation ``Y[L] = F(..., A[e(L, R)], ...)`` (R: the indices of
the sum around the access), the chain rule gives the contribution

    gA[a] += Σ_{L, R} gY[L] · ∂F/∂A[e] · Π_k δ(a_k, e_k(L, R))

— the scatter form (eq. 4 for the convolution).  Each Kronecker delta is then
eliminated by solving ``a_k = e_k`` for one summed index (Halide/TVM-style
inversion of a shifted access), which turns the scatter into a gather with
an explicit range guard; a stride ``a = S·i + p`` with 0 ≤ p < S is inverted
by Euclidean division, ``i = ⌊a/S⌋, p = a mod S``.  Intermediates' adjoints
are inlined into their consumers; ``simplify.py`` then rewrites reductions
the backward computes anyway (∂L/∂γ, ∂L/∂β, μ) by their names, which gives
eq. 50's compact form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import sympy as sp

from vggen.derive.simplify import simplify_gradient
from vggen.errors import VggenError
from vggen.frontend.lang import (
    REDUCTIONS,
    Equation,
    Layer,
    Role,
    Tensor,
    affine_range,
    gradient_tensor,
    iverson,
    provably,
)


@dataclass
class Gradient:
    """∂L/∂(of), as a gather equation ``tensor[indices] = rhs``."""

    of: Tensor
    tensor: Tensor
    equation: Equation
    scatter: sp.Expr          # the chain rule's raw form, before delta elimination

    @property
    def name(self) -> str:
        return self.tensor.name


@dataclass
class Backward:
    layer: Layer
    seeds: list[Tensor]                   # ∂L/∂(output): given
    gradients: list[Gradient]             # in an order where each reads only earlier ones
    program: Layer = field(init=False)    # the backward as a validated layer

    def __post_init__(self):
        fwd = self.layer
        # the forward's tensors (but its outputs) and the seeds, all given
        tensors = [dataclasses.replace(t, role=Role.INPUT, differentiable=False)
                   for t in fwd.tensors if t.role is not Role.OUTPUT]
        tensors += [dataclasses.replace(t, role=Role.INPUT, differentiable=False) for t in self.seeds]
        tensors += [g.tensor for g in self.gradients]
        self.program = Layer(f"{fwd.name} backward", tensors, [g.equation for g in self.gradients],
                             constants=fwd.constants, direction="backward")

    def gradient(self, of: str) -> Gradient:
        for g in self.gradients:
            if g.of.name == of:
                return g
        raise KeyError(of)


# --------------------------------------------------------------------------- chain rule


@dataclass
class _Term:
    """Σ_{sums} [guards] · factor · Π δ(a, e) — one contribution being simplified."""

    factor: sp.Expr
    sums: list            # [(dummy, lo, hi)] inclusive
    deltas: list          # [(target index, index expression)]
    guards: list = field(default_factory=list)
    outer: set = field(default_factory=set)   # dummies that were the forward's output indices


class Mask(sp.Function):
    """[cond] held opaque while a derivation is built.

    SymPy folds every Piecewise in a Sum's body outward on construction
    (``piecewise_fold``), through nested Sums too, which lets a condition on
    an inner summed index escape its Sum.  A ReLU's ∂y/∂x is a Piecewise; in
    a composed layer (BN → ReLU) it multiplies reductions, so it is kept as
    this function until the gradients are final, then turned back into an
    Iverson bracket (:func:`_unmask`).
    """

    nargs = 1
    is_commutative = True
    is_real = True

    def fdiff(self, argindex=1):      # piecewise constant: no gradient (a.e.)
        return sp.Integer(0)


def _mask_piecewise(expr: sp.Expr) -> sp.Expr:
    """Piecewise((e, c), (0, True)) → e·Mask(c)."""
    def fold(p):
        if len(p.args) == 2 and p.args[1].cond is sp.true and p.args[1].expr == 0:
            return p.args[0].expr * Mask(p.args[0].cond)
        return p
    return expr.replace(lambda n: isinstance(n, sp.Piecewise), fold)


def _unmask(expr: sp.Expr) -> sp.Expr:
    return expr.replace(lambda n: isinstance(n, Mask), lambda m: iverson(m.args[0]))


def _partials(rhs: sp.Expr, acc: sp.Indexed):
    """Yield (reduction node or None, ∂rhs/∂acc) for each place ``acc`` occurs.

    An access inside a Sum is differentiated through the Sum: ∂F/∂Σ · ∂body/∂acc,
    with the Sum's indices left to sum over.  Max/argmax reductions carry no
    gradient (their results are declared non-differentiable).
    """
    nodes = [n for n in rhs.atoms(*REDUCTIONS) if isinstance(n, sp.Sum) and n.function.has(acc)]
    for n in nodes:
        if n.function.atoms(*REDUCTIONS):
            raise VggenError(f"nested reductions are not supported: {n}")
        hole = sp.Dummy("sum")
        outer = sp.diff(rhs.xreplace({n: hole}), hole).xreplace({hole: n})
        inner = _diff_access(n.function, acc)
        if outer != 0 and inner != 0:
            yield n, _mask_piecewise(outer * inner)
    masked = rhs.xreplace({n: sp.Dummy("r") for n in rhs.atoms(*REDUCTIONS)})
    if masked.has(acc):
        d = _diff_access(masked, acc)
        if d != 0:
            yield None, _mask_piecewise(d)


def _diff_access(expr, acc):
    hole = sp.Dummy("v", real=True)
    return sp.diff(expr.xreplace({acc: hole}), hole).xreplace({hole: acc})


def _natural_indices(layer: Layer, t: Tensor) -> tuple:
    """Readable index names for gA: a plain index where the forward reads A by one,
    else the one at the same position of the first equation's left-hand side."""
    names = []
    first = layer.equations[0].lhs.indices
    for k in range(t.rank):
        plain = [acc.indices[k] for eq in layer.equations for acc in eq.rhs.atoms(sp.Indexed)
                 if str(acc.base.label) == t.name and isinstance(acc.indices[k], sp.Symbol)]
        cand = [v for v in plain + ([first[k]] if k < len(first) else []) if v not in names]
        names.append(cand[0] if cand else sp.Symbol(f"a{k}", integer=True))
    return tuple(names)


def _eliminate_deltas(term: _Term, ranges: dict) -> _Term:
    """Solve each δ(a, e) for a summed index of e; what cannot be solved stays a guard."""
    while term.deltas:
        a, e = term.deltas.pop(0)
        summed = {v for v, _, _ in term.sums}
        cands = [v for v in e.free_symbols & summed
                 if not sp.diff(e, v).free_symbols & summed and not sp.diff(e, v).has(v)]
        if not cands:
            term.guards.append(sp.Eq(a, e))
            continue
        # invert the forward's output position (i in i + i′), leaving the window summed
        cands.sort(key=lambda v: (v not in term.outer, abs(sp.diff(e, v)) != 1, v.name))
        v = cands[0]
        coeff = sp.diff(e, v)
        rest = sp.expand(e - coeff * v)
        bounds = {s: (lo, hi) for s, lo, hi in term.sums}
        window = _unit_window(rest, coeff, bounds)
        if coeff in (1, -1):
            subs = {v: sp.expand((a - rest) / coeff)}
        elif window is not None:
            # a = c·v + p + r with 0 ≤ p < c: Euclidean division fixes both
            p = window
            r = sp.expand(rest - p)
            subs = {v: sp.floor((a - r) / coeff), p: sp.Mod(a - r, coeff)}
        else:
            subs = {v: (a - rest) / coeff}
            term.guards.append(sp.Eq(sp.Mod(a - rest, coeff), 0))
        new_ranges = dict(ranges)
        new_ranges.update({s: (lo, hi) for s, lo, hi in term.sums if s not in subs})
        for s, val in subs.items():
            lo, hi = bounds[s]
            if s is window:   # a residue is in range by construction
                continue
            rng = affine_range(val, new_ranges)
            if not (rng and provably(rng[0] >= lo) and provably(rng[1] <= hi)):
                term.guards += [val >= lo, val <= hi]
        term.sums = [(s, lo, hi) for s, lo, hi in term.sums if s not in subs]
        term.factor = term.factor.xreplace(subs)
        term.deltas = [(x, y.xreplace(subs)) for x, y in term.deltas]
        term.guards = [g.xreplace(subs) for g in term.guards]
    return term


def _unit_window(rest, coeff, bounds):
    """The summed index p in ``rest`` with coefficient 1 and range [0, coeff − 1], if any."""
    for p in sorted(rest.free_symbols & set(bounds), key=lambda s: s.name):
        lo, hi = bounds[p]
        if sp.diff(rest, p) == 1 and lo == 0 and sp.simplify(hi - (coeff - 1)) == 0:
            return p
    return None


def _to_expr(term: _Term) -> sp.Expr:
    guards = [g for g in term.guards if g is not sp.true and not provably(g)]
    body = term.factor * (iverson(sp.And(*guards)) if guards else 1)
    if not term.sums:
        return body
    return sp.Sum(body, *term.sums)


def _rename_readably(expr: sp.Expr, taken: set) -> sp.Expr:
    """Give summed dummies back their forward names (i′ → di), avoiding ``taken``."""
    mapping = {}
    used = set(s.name for s in taken)
    for d in sorted(expr.atoms(sp.Dummy), key=lambda s: s.dummy_index):
        name = d.name
        while name in used:
            name += "2"
        used.add(name)
        mapping[d] = sp.Symbol(name, integer=True)
    return expr.xreplace(mapping)


def derive(layer: Layer) -> Backward:
    """∂L/∂(every differentiable input and parameter) of ``layer``."""
    seeds = {t.name: gradient_tensor(t) for t in layer.outputs}
    adjoint: dict[str, list[sp.Expr]] = {}       # tensor -> contributions (in its index names)
    scatter: dict[str, list[sp.Expr]] = {}
    index_names = {t.name: _natural_indices(layer, t) for t in layer.tensors}

    for eq in reversed(layer.equations):
        Y = layer.tensor(eq.target)
        if not Y.differentiable:
            continue
        if Y.role is Role.OUTPUT:
            upstream = seeds[Y.name].base[eq.lhs.indices]
        elif Y.name in adjoint:
            own = index_names[Y.name]
            upstream = sp.Add(*adjoint[Y.name]).xreplace(dict(zip(own, eq.lhs.indices)))
        else:
            continue
        for acc in sorted(eq.rhs.atoms(sp.Indexed), key=sp.default_sort_key):
            A = layer.tensor(str(acc.base.label))
            if not A.differentiable or A.role is Role.OUTPUT:
                continue
            a = index_names[A.name]
            ranges = dict(zip(a, A.index_ranges()))
            for node, partial in _partials(eq.rhs, acc):
                fresh = {v: sp.Dummy(v.name, integer=True) for v in eq.lhs.indices}
                limits = [(v, lo, hi) for v, lo, hi in (node.limits if node is not None else ())]
                fresh.update({v: sp.Dummy(v.name, integer=True) for v, _, _ in limits})
                out_ranges = dict(zip(eq.lhs.indices, Y.index_ranges()))
                sums = [(fresh[v], out_ranges[v][0], out_ranges[v][1]) for v in eq.lhs.indices]
                sums += [(fresh[v], lo.xreplace(fresh), hi.xreplace(fresh)) for v, lo, hi in limits]
                term = _Term(factor=(upstream * partial).xreplace(fresh), sums=sums,
                             deltas=[(ak, sp.sympify(e).xreplace(fresh)) for ak, e in zip(a, acc.indices)],
                             outer={fresh[v] for v in eq.lhs.indices})
                scatter.setdefault(A.name, []).append(
                    sp.Sum(term.factor * sp.Mul(*[sp.KroneckerDelta(x, y) for x, y in term.deltas]),
                           *term.sums))
                term = _eliminate_deltas(term, ranges)
                adjoint.setdefault(A.name, []).append(_rename_readably(_to_expr(term), set(a)))

    gradients = []
    for A in layer.differentiable_inputs:
        if A.name not in adjoint:
            raise VggenError(f"layer {layer.name}: no equation reads {A.name}, so it has no gradient")
        g = gradient_tensor(A)
        lhs = g.base[index_names[A.name]]
        gradients.append(Gradient(A, g, Equation(lhs, sp.Add(*adjoint[A.name]), f"∂L/∂{A.name}"),
                                  sp.Add(*scatter[A.name])))
    gradients = simplify_gradient(layer, gradients)
    for g in gradients:
        g.equation = Equation(g.equation.lhs, _unmask(g.equation.rhs), g.equation.label)
        g.scatter = _unmask(g.scatter)
    return Backward(layer, list(seeds.values()), gradients)
