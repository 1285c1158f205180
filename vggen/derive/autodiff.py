"""Reverse-mode derivation of a layer's backward equations, in gather form.

For a forward equation ``Y[L] = F(..., A[e(L, R)], ...)`` (R: the indices of
the sum around the access), the chain rule gives the contribution

    gA[a] += Σ_{L, R} gY[L] · ∂F/∂A[e] · Π_k δ(a_k, e_k(L, R))

— the scatter form (eq. 4 for the convolution).  Each Kronecker delta is then
eliminated by solving ``a_k = e_k`` for one summed index (Halide/TVM-style
inversion of a shifted access), which turns the scatter into a gather with
an explicit range guard.  A strided access ``a = s·i + d·p + c`` is inverted
over exactly the window positions p that reach a (p ≡ d⁻¹(a − c) mod s: a
loop of ⌈K/s⌉ steps of s, none where K ≤ s — max pooling's ``i = ⌊a/S⌋,
p = a mod S``), and an index through floor or Mod over its preimage
(⌊i/s⌋ = a: i = s·a + m, 0 ≤ m < s).  Intermediates' adjoints
are inlined into their consumers; ``simplify.py`` then rewrites reductions
the backward computes anyway (∂L/∂γ, ∂L/∂β, μ) by their names, which gives
eq. 50's compact form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import sympy as sp

from vggen.derive.indices import simplify_index, simplify_indices
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
    nonneg,
    provably,
    proves_nonneg,
    quotient,
)


@dataclass
class Gradient:
    """∂L/∂(of), as a gather equation ``tensor[indices] = rhs``."""

    of: Tensor
    tensor: Tensor
    equation: Equation

    @property
    def name(self) -> str:
        return self.tensor.name


@dataclass
class Backward:
    layer: Layer
    seeds: list[Tensor]                   # ∂L/∂(output): given
    gradients: list[Gradient]             # in an order where each reads only earlier ones
    # (tensor, equation) of each reduction a gradient reads, computed once before it
    reductions: list = field(default_factory=list)
    program: Layer = field(init=False)    # the backward as a validated layer

    def __post_init__(self):
        fwd = self.layer
        # the forward's tensors (but its outputs) and the seeds, all given
        tensors = [dataclasses.replace(t, role=Role.INPUT, differentiable=False)
                   for t in fwd.tensors if t.role is not Role.OUTPUT]
        tensors += [dataclasses.replace(t, role=Role.INPUT, differentiable=False) for t in self.seeds]
        tensors += [t for t, _ in self.reductions] + [g.tensor for g in self.gradients]
        equations = [eq for _, eq in self.reductions] + [g.equation for g in self.gradients]
        self.program = Layer(f"{fwd.name} backward", tensors, equations,
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
    last_split: dict = field(default_factory=dict)   # _split_by_divisor's v → s·q + m


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
    """∂expr/∂acc with every tensor element real (so that ∂|x − t|/∂x is
    sign(x − t), not an expression in re(t) and |x − t|)."""
    holes = {a: sp.Dummy("v", real=True) for a in expr.atoms(sp.Indexed)}
    holes.setdefault(acc, sp.Dummy("v", real=True))
    back = {h: a for a, h in holes.items()}
    return sp.diff(expr.xreplace(holes), holes[acc]).xreplace(back)


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
    """Solve each δ(a, e) for a summed index of e; what cannot be solved stays a guard.

    An index through floor or Mod is first rewritten as a linear δ over a new
    summed index (its preimage); a linear δ is solved for the forward's
    output position, by a stride inversion where that is scaled (see
    :func:`_invert_stride`).  Every substituted index is held to its range by
    a guard, dropped where ``lang.proves_nonneg`` shows it.
    """
    while term.deltas:
        a, e = term.deltas.pop(0)
        summed = {v for v, _, _ in term.sums}
        if _unwrap(term, a, e, summed, ranges):
            continue
        if _split_by_divisor(term, e, summed, ranges):
            term.deltas.insert(0, (a, simplify_index(e.xreplace(term.last_split), _bounds(term, ranges))))
            continue
        solved = _solve_linear(term, a, e, summed, ranges)
        if solved is None:
            term.guards.append(sp.Eq(a, e))
            continue
        subs, new, guards = solved
        sums = []
        for s, lo, hi in term.sums:
            if s in new:
                sums.append(new[s])
            elif s not in subs:
                sums.append((s, lo, hi))
        term.sums = sums
        term.factor = term.factor.xreplace(subs)
        term.deltas = [(x, y.xreplace(subs)) for x, y in term.deltas]
        term.guards = [g.xreplace(subs) for g in term.guards] + guards
    return term


def _in_range(val, lo, hi, ranges: dict) -> list:
    """lo ≤ val ≤ hi as guards, less the bounds ``ranges`` prove."""
    out = []
    # Ge/Le, not >=/<=: floor's operators would rewrite ⌊i/2⌋ ≤ H − 1 as i/2 < H
    if not proves_nonneg(val - lo, ranges):
        out.append(sp.Ge(val, lo))
    if not proves_nonneg(hi - val, ranges):
        out.append(sp.Le(val, hi))
    return out


def _summed_nodes(e, summed: set) -> list:
    return [n for n in e.atoms(sp.floor, sp.Mod) if n.free_symbols & summed]


def _unwrap(term: _Term, a, e, summed: set, ranges: dict) -> bool:
    """δ(a, F + γ) with F = ⌊N/s⌋ or N mod s (N over summed indices) → a linear
    δ over a new summed index m, which runs over F's preimage:

    * ⌊N/s⌋ = A  ⟺  N = s·A + m for one m in [0, s − 1] (nearest upsampling:
      each x element gathers its s×s block);
    * N mod s = A  ⟺  0 ≤ A < s and N = A + s·m for one m in ⌊range(N)/s⌋.

    False where ``e`` is not of that form (the δ is left to the linear solver)."""
    nodes = _summed_nodes(e, summed)
    if len(nodes) != 1 or not isinstance(nodes[0], (sp.floor, sp.Mod)):
        return False
    node = nodes[0]
    gamma = sp.expand(e - node)
    if gamma.free_symbols & summed or gamma.has(node):
        return False
    if isinstance(node, sp.floor):
        q = quotient(node.args[0])
        if q is None or q[1].free_symbols & summed:
            return False
        n, s = q
        lo, hi = sp.Integer(0), s - 1
    else:
        n, s = node.args
        if not (s.is_integer and s.is_positive) or s.free_symbols & summed:
            return False
        bounds = {**ranges, **{v: (l, h) for v, l, h in term.sums}}
        rng = affine_range(n, bounds)
        if rng is None:
            return False
        lo, hi = sp.floor(rng[0] / s), sp.floor(rng[1] / s)
    inner = sorted(n.free_symbols & summed, key=lambda v: v.name)
    if not inner:
        return False
    m = sp.Dummy(inner[0].name, integer=True)
    at = 1 + max(k for k, (v, _, _) in enumerate(term.sums) if v in n.free_symbols)
    term.sums.insert(at, (m, lo, hi))
    target = sp.expand(a - gamma)
    if isinstance(node, sp.floor):
        term.deltas.insert(0, (s * target, sp.expand(n - m)))
    else:
        term.guards += _in_range(target, 0, s - 1, ranges)       # a residue, or nothing reads it
        term.deltas.insert(0, (target, sp.expand(n - s * m)))
    return True


def _bounds(term: _Term, ranges: dict) -> dict:
    return {**ranges, **{v: (lo, hi) for v, lo, hi in term.sums}}


def _split_by_divisor(term: _Term, e, summed: set, ranges: dict) -> bool:
    """A summed index v that ``e`` reads through ⌊v/s⌋ alongside other summed
    indices (a grouped convolution's input channel CG·⌊o/OG⌋ + c) split as
    v = s·q + m, m in [0, s − 1], everywhere in the term: ``e`` is then
    linear in q, which the stride inversion solves (q = ⌊a/CG⌋), and the
    gather runs over m alone, the s outputs of one group, not over every v.

    False where ``e`` has no such ⌊v/s⌋ (v a plain summed index, s a positive
    integer free of summed indices)."""
    for node in sorted(_summed_nodes(e, summed), key=sp.default_sort_key):
        if not isinstance(node, sp.floor):
            continue
        qt = quotient(node.args[0])
        if qt is None or qt[0] not in summed or qt[1].free_symbols & summed:
            continue
        v, d = qt
        (lo, hi), = [(l, h) for x, l, h in term.sums if x == v]
        q, m = sp.Dummy(f"{v.name}_over_{d}", integer=True), sp.Dummy(v.name, integer=True)
        bounds = _bounds(term, ranges)
        q_range = [simplify_index(sp.floor(x / d), bounds) for x in (lo, hi)]
        sums = []
        for x, l, h in term.sums:
            sums += [(q, *q_range), (m, sp.Integer(0), d - 1)] if x == v else [(x, l, h)]
        term.sums = sums
        term.last_split = {v: d * q + m}
        after = _bounds(term, ranges)
        term.factor = simplify_indices(term.factor.xreplace(term.last_split), after)
        term.deltas = [(x, simplify_index(y.xreplace(term.last_split), after)) for x, y in term.deltas]
        term.guards = [g.xreplace(term.last_split) for g in term.guards] + _in_range(d * q + m, lo, hi, after)
        term.outer = (term.outer - {v}) | ({q, m} if v in term.outer else set())
        return True
    return False


def _solve_linear(term: _Term, a, e, summed: set, ranges: dict):
    """(substitutions, replaced sums, guards) solving δ(a, e) for one summed
    index of e, or None where e is not linear in one with a coefficient free
    of the others."""
    if _summed_nodes(e, summed):
        return None
    cands = [v for v in e.free_symbols & summed
             if not sp.diff(e, v).free_symbols & summed and not sp.diff(e, v).has(v)]
    if not cands:
        return None
    # invert the forward's output position (i in i + i′), leaving the window summed
    cands.sort(key=lambda v: (v not in term.outer, abs(sp.diff(e, v)) != 1, v.name))
    v = cands[0]
    coeff = sp.diff(e, v)
    rest = sp.expand(e - coeff * v)
    if coeff in (1, -1):
        subs, new, guards = {v: sp.expand((a - rest) / coeff)}, {}, []
    else:
        solved = _invert_stride(term, a, v, coeff, rest, summed)
        if solved is None:
            return None
        subs, new, guards = solved
    after = dict(ranges)
    after.update({s: (lo, hi) for s, lo, hi in term.sums if s not in subs})
    after.update({m: (lo, hi) for m, lo, hi in new.values()})
    bounds = {s: (lo, hi) for s, lo, hi in term.sums}
    guards += _in_range(subs[v], *bounds[v], after)
    return subs, new, [g for g in guards if not _proved_guard(g, after)]


def _proved_guard(g, ranges: dict) -> bool:
    d = nonneg(g)
    return g is sp.true or (d is not None and proves_nonneg(d, ranges))


def _invert_stride(term: _Term, a, v, s, rest, summed: set):
    """Solve a = s·v + d·p + c (v the output position, s > 1 its stride, p a
    window index over [lo, lo + K − 1] with dilation d, c free of v and p) as a
    gather over exactly the window positions that reach a.

    With g = gcd(s, d), only a ≡ c (mod g) is reached (a guard); dividing by g
    leaves s′·v + d′·p̃ = A (p̃ = p − lo, A = (a − c − d·lo)/g, gcd(s′, d′) = 1),
    so p̃ ≡ d′⁻¹·A (mod s′): p̃ = r + s′·m with r = (d′⁻¹·A) mod s′ and m over
    [0, ⌈K/s′⌉ − 1], and v = (A − d′·r)/s′ − d′·m, an exact integer division
    written as a floor.  A window no wider than the stride (K ≤ s′) leaves no
    loop: max pooling's i = ⌊a/S⌋, p = a mod S.  Returns None for a stride
    or a dilation it cannot reason about (not a positive integer, symbolic
    with a gcd unknown)."""
    if not (s.is_integer and s.is_positive):
        return None
    bounds = {x: (lo, hi) for x, lo, hi in term.sums}
    p, d = _window(rest, summed - {v}, bounds)
    c, lo, flip, K, fixed = rest, sp.Integer(0), False, sp.Integer(1), {}
    if p is not None:
        lo, hi = bounds[p]
        K = sp.expand(hi - lo + 1)
        c = sp.expand(rest - d * p)
        flip = bool(d.is_negative)
        if flip:              # p = hi − p̃ runs the window backwards
            c, d, lo = sp.expand(c + d * hi), -d, hi
        else:
            c = sp.expand(c + d * lo)
        if K == 1:            # a single position: no window to solve for
            fixed, p, d = {p: lo}, None, sp.Integer(0)
    if d == 0:
        g = s
    elif d == 1:
        g = sp.Integer(1)
    elif s.is_Integer and d.is_Integer:
        g = sp.igcd(s, d)
    else:
        return None
    A = sp.expand(a - c)
    guards, subs, new = [], dict(fixed), {}
    if g != 1:
        guards.append(sp.Eq(sp.Mod(A, g), 0))
        A = sp.floor(A / g)
    s1, d1 = sp.simplify(s / g), sp.simplify(d / g)
    if p is None:
        subs[v] = A if s1 == 1 else sp.floor(A / s1)
        return subs, new, guards
    inv = 1 if d1 == 1 or s1 == 1 else sp.mod_inverse(int(d1), int(s1))
    r = sp.Mod(inv * A, s1)
    if provably(sp.Le(K, s1)):
        m = sp.Integer(0)
    else:
        m = sp.Dummy(p.name, integer=True)
        last = sp.ceiling(K / s1) - 1 if (K.is_Integer and s1.is_Integer) else sp.floor((K - 1) / s1)
        new[p] = (m, sp.Integer(0), last)
    offset = r + s1 * m
    subs[p] = lo - offset if flip else lo + offset
    subs[v] = (sp.floor(A / s1) if d1 == 1 else sp.floor((A - d1 * r) / s1)) - d1 * m
    guards.append(sp.Le(offset, K - 1))
    return subs, new, guards


def _window(rest, summed: set, bounds: dict):
    """(p, d): the summed index of ``rest`` with a constant-width range and an
    integer coefficient d free of summed indices (the window a strided access
    slides over), or (None, 0)."""
    for p in sorted(rest.free_symbols & summed, key=lambda x: x.name):
        d = sp.diff(rest, p)
        lo, hi = bounds[p]
        width = sp.expand(hi - lo)
        if d != 0 and d.is_integer and not d.free_symbols & summed and not width.free_symbols & summed:
            return p, d
    return None, sp.Integer(0)


def _to_expr(term: _Term) -> sp.Expr:
    guards = [g for g in term.guards if g is not sp.true and not provably(g)]
    # the guarded value, not value × [guard]: a read the guard keeps in range
    # must sit inside it (a product would read it either way)
    body = sp.Piecewise((term.factor, sp.And(*guards)), (0, True)) if guards else term.factor
    if not term.sums:
        return body
    return sp.Sum(body, *term.sums)


def _fresh_bound(expr: sp.Expr) -> sp.Expr:
    """Every sum's own indices made fresh dummies.  An inlined adjoint's sums
    carry readable names (i, j) that the consuming equation may use for its
    own window; renaming that window (xreplace) would otherwise capture them."""
    def rebind(node: sp.Sum) -> sp.Sum:
        mapping = {v: sp.Dummy(v.name, integer=True) for v, _, _ in node.limits}
        return sp.Sum(node.function.xreplace(mapping),
                      *[(mapping[v], lo, hi) for v, lo, hi in node.limits])
    return expr.replace(lambda n: isinstance(n, sp.Sum), rebind)


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
    index_names = {t.name: _natural_indices(layer, t) for t in layer.tensors}

    for eq in reversed(layer.equations):
        Y = layer.tensor(eq.target)
        if not Y.differentiable:
            continue
        if Y.role is Role.OUTPUT:
            upstream = seeds[Y.name].base[eq.lhs.indices]
        elif Y.name in adjoint:
            own = index_names[Y.name]
            upstream = _fresh_bound(sp.Add(*adjoint[Y.name])).xreplace(dict(zip(own, eq.lhs.indices)))
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
                term = _eliminate_deltas(term, ranges)
                contribution = simplify_indices(_to_expr(term), ranges)
                adjoint.setdefault(A.name, []).append(_rename_readably(contribution, set(a)))

    gradients = []
    for A in layer.differentiable_inputs:
        if A.name not in adjoint:
            raise VggenError(f"layer {layer.name}: no equation reads {A.name}, so it has no gradient")
        g = gradient_tensor(A)
        lhs = g.base[index_names[A.name]]
        gradients.append(Gradient(A, g, Equation(lhs, sp.Add(*adjoint[A.name]), f"∂L/∂{A.name}")))
    gradients, reductions = simplify_gradient(layer, gradients)
    for g in gradients:
        g.equation = Equation(g.equation.lhs, _unmask(g.equation.rhs), g.equation.label)
    reductions = [(t, Equation(eq.lhs, _unmask(eq.rhs), eq.label)) for t, eq in reductions]
    return Backward(layer, list(seeds.values()), gradients, reductions)
