"""Simplify derived gradients into kernel-friendly forms.

Two rewrites, both by construction rather than by pattern for one layer:

* **Known reductions.**  A gradient that mixes elementwise terms with sums
  (BatchNormalization's ∂L/∂x) has its sums split into atomic sums
  (Σ gy·x, Σ gy, Σ x, …) with the factors that do not depend on the summed
  indices pulled out.  Reductions the program computes anyway — forward
  intermediates (μ·BHW = Σ x) and gradients that are pure reductions
  (∂L/∂γ, ∂L/∂β) — are expanded the same way, and the linear system they form
  is solved for the atomic sums.  Each atomic sum that comes out in terms of
  named quantities alone is replaced: eq. 34's expansion becomes eq. 50's
  compact form, and Σ (x − μ) = 0 falls out of μ's definition.
* **Saved intermediates.**  Where an elementwise saved tensor (x̂) can be
  solved for an input (x = μ + x̂·√(σ² + ε)), the input is replaced by it if
  that leaves the kernel reading no more tensors; where its definition (σ(x),
  tanh(x)) occurs in a gradient, the gradient reads it instead.

* **Reductions of their own.**  A sum that is still left in an elementwise
  gradient and does not depend on every one of its indices (per-sample
  normalisation's Σ_{c,i,j} g_y·γ·x̂ in ∂L/∂x[b,c,i,j]) would be recomputed
  for each element: O(n²) work.  Inputs are first read through the saved
  tensor that inverts them, inside the sums too (x = μ + x̂·√(σ² + ε): the μ
  terms then cancel exactly, where the expanded form cancelled in floating
  point), and each such sum becomes a tensor of its own, indexed by the
  indices it depends on, computed once by its own equation before the
  gradient reads it (:func:`extract_reductions`).

And one for stability: a backward is never less stable than its forward.
Logistic expressions in exp become σ (``stabilise``), and ``tidy`` keeps
SymPy's simplification only where it brings in no new function and no new
exp (1 − tanh² stays; it does not become 1/cosh²).
"""

from __future__ import annotations

import itertools

import sympy as sp

from vggen.derive.indices import simplify_index, simplify_indices
from vggen.frontend.functions import sigmoid
from vggen.frontend.lang import REDUCTIONS, Layer, Role, affine_range, quotient

# --------------------------------------------------------------------------- atomic sums


def _canonical(atom: sp.Sum) -> sp.Sum:
    """Rename summed indices canonically, so equal sums compare equal."""
    best = None
    limits = list(atom.limits)
    for perm in itertools.permutations(limits):
        names = {v: sp.Symbol(f"_k{n}", integer=True) for n, (v, _, _) in enumerate(perm)}
        cand = sp.Sum(atom.function.xreplace(names),
                      *[(names[v], lo, hi) for v, lo, hi in perm])
        key = sp.srepr(cand)
        if best is None or key < best[0]:
            best = (key, cand)
    return best[1]


def split_sums(expr: sp.Expr) -> sp.Expr:
    """Σ over sums of products → Σ coefficient · atomic Σ, coefficients outside."""
    if not expr.has(sp.Sum):
        return expr
    if isinstance(expr, sp.Sum):
        body = sp.expand(split_sums(expr.function))
        bound = {v for v, _, _ in expr.limits}
        total = sp.Integer(0)
        for term in sp.Add.make_args(body):
            factors = sp.Mul.make_args(term)
            dep = [f for f in factors if f.free_symbols & bound]
            indep = [f for f in factors if not f.free_symbols & bound]
            used = [(v, lo, hi) for v, lo, hi in expr.limits
                    if any(v in f.free_symbols for f in dep)]
            count = sp.Mul(*[hi - lo + 1 for v, lo, hi in expr.limits if (v, lo, hi) not in used])
            atom = _canonical(sp.Sum(sp.Mul(*dep), *used)) if used else sp.Mul(*dep)
            total += sp.Mul(*indep) * count * atom
        return total
    return sp.expand(expr.func(*[split_sums(a) if isinstance(a, sp.Basic) else a for a in expr.args]))


def _atoms(expr) -> set:
    return {s for s in expr.atoms(sp.Sum)}


# --------------------------------------------------------------------------- catalogue


def _inline_elementwise(layer: Layer, expr: sp.Expr) -> sp.Expr:
    """Replace reads of elementwise saved tensors (x̂) by their definitions."""
    for eq in reversed(layer.equations):
        t = layer.tensor(eq.target)
        if t.role is not Role.SAVED or eq.rhs.has(sp.Sum):
            continue
        for acc in list(expr.atoms(sp.Indexed)):
            if str(acc.base.label) == t.name:
                expr = expr.xreplace({acc: eq.rhs.xreplace(dict(zip(eq.lhs.indices, acc.indices)))})
    return expr


def _known_reductions(layer: Layer, gradients, exclude) -> list[tuple]:
    """(name access template, lhs indices, ranges, definition) of every reduction
    the program computes anyway."""
    out = []
    for eq in layer.equations:
        if eq.rhs.has(sp.Sum) and layer.tensor(eq.target).role is Role.SAVED:
            out.append((eq.lhs, layer.tensor(eq.target).index_ranges(), eq.rhs))
    for g in gradients:
        if g is not exclude and is_pure_reduction(g.equation.rhs):
            out.append((g.equation.lhs, g.tensor.index_ranges(), g.equation.rhs))
    return out


def is_pure_reduction(expr: sp.Expr) -> bool:
    """coefficient · Σ(...): one reduction, nothing elementwise beside it."""
    sums = [t for t in sp.Add.make_args(expr) if t.has(sp.Sum)]
    return len(sums) == len(sp.Add.make_args(expr)) == 1


def _instances(template, ranges, target_ranges: dict):
    """The template's index renamed onto the target's indices, every way the ranges allow."""
    own = list(template.indices)
    options = [[v for v, r in target_ranges.items() if r == rng] for rng in ranges]
    for choice in itertools.product(*options):
        if len(set(choice)) == len(choice):
            yield dict(zip(own, choice))


def match_known_sums(layer: Layer, expr: sp.Expr, known, target_ranges: dict) -> sp.Expr:
    expanded = split_sums(_inline_elementwise(layer, expr))
    target_atoms = _atoms(expanded)
    if not target_atoms:
        return expr
    equations, unknowns = [], set(target_atoms)
    for template, ranges, definition in known:
        for mapping in _instances(template, ranges, target_ranges):
            d = split_sums(_inline_elementwise(layer, definition.xreplace(mapping)))
            if _atoms(d) & target_atoms or _atoms(d) & unknowns:
                equations.append(template.xreplace(mapping) - d)
                unknowns |= _atoms(d)
    if not equations:
        return expr
    placeholders = {a: sp.Dummy("S") for a in unknowns}
    eqs = [e.xreplace(placeholders) for e in equations]
    order = sorted(placeholders.values(), key=lambda d: d.dummy_index)
    sols = sp.linsolve(eqs, order)
    if not sols:
        return expr
    sol = dict(zip(order, next(iter(sols))))
    ph = set(order)
    subs = {a: sol[placeholders[a]] for a in target_atoms
            if not (sol[placeholders[a]].free_symbols & ph)}
    if not subs:
        return expr
    return sp.expand(expanded.xreplace(subs))


# --------------------------------------------------------------------------- saved tensors


def prefer_saved(layer: Layer, expr: sp.Expr, lhs_indices) -> sp.Expr:
    """Read x̂ instead of x (and μ) where the saved tensor's definition can be inverted."""
    for eq in layer.equations:
        t = layer.tensor(eq.target)
        if t.role is not Role.SAVED or eq.rhs.has(sp.Sum):
            continue
        for src in eq.rhs.atoms(sp.Indexed):
            if tuple(src.indices) != tuple(eq.lhs.indices):
                continue
            hole = sp.Dummy("x")
            sols = sp.solve(sp.Eq(eq.lhs, eq.rhs.xreplace({src: hole})), hole)
            if len(sols) != 1:
                continue
            mapping = dict(zip(eq.lhs.indices, lhs_indices))
            here = src.xreplace(mapping)
            if not expr.has(here):
                continue
            cand = sp.simplify(expr.xreplace({here: sols[0].xreplace(mapping)}))
            reads = lambda e: {str(a.base.label) for a in e.atoms(sp.Indexed)}  # noqa: E731
            if str(src.base.label) not in reads(cand) and len(reads(cand)) <= len(reads(expr)):
                expr = cand
    return expr


def tidy(expr: sp.Expr) -> sp.Expr:
    """A compact, deterministic form: common factors pulled out.

    ``sp.simplify``'s result is kept only where it applies no function the
    expression did not (1 − tanh² must not become 1/cosh², σ(1 − σ) not
    1/(4 cosh²(x/2))) and no exp of an argument the expression had no exp of
    (no e^{2x} where there was e^x): each would overflow where the forward
    does not.  Otherwise common factors are pulled out of the expression as
    it is."""
    if expr.has(sp.Sum) or expr.has(sp.Piecewise):
        return expr
    simple = sp.simplify(expr)
    return sp.factor_terms(simple if _no_new_functions(expr, simple) else expr)


def _functions(expr) -> set:
    return {type(f) for f in expr.atoms(sp.Function)}


def _exp_arguments(expr) -> set:
    out = set()
    for e in expr.atoms(sp.exp):
        out |= {e.args[0], sp.expand(-e.args[0])}
    return out


def _no_new_functions(before, after) -> bool:
    return _functions(after) <= _functions(before) \
        and {e.args[0] for e in after.atoms(sp.exp)} <= _exp_arguments(before)


# --------------------------------------------------------------------------- stability


def stabilise(expr: sp.Expr) -> sp.Expr:
    """Logistic expressions in exp written as σ (``functions.sigmoid``).

    For each family e^{±u} of ``expr``, e^u = σ(u)/(1 − σ(u)) and
    e^{−u} = (1 − σ(u))/σ(u) are substituted; where the result, as a
    rational function of σ(u), has no σ left below the fraction line it
    replaces the expression: 1/(1 + e^{−x}) → σ(x), e^x/(1 + e^x) → σ(x)
    (softplus'), e^{−x}/(1 + e^{−x})² → σ(x)(1 − σ(x)) (σ'), whose helper
    never overflows, where the exp form gives ∞/∞ for large |x|.  Elsewhere
    (e^x alone, softmax's e^{x−m}/s, GELU's e^{−x²/2}) nothing changes."""
    if not expr.has(sp.exp):
        return expr
    # a Piecewise's values one by one (cancel would hold each whole, as a symbol)
    expr = expr.replace(lambda n: isinstance(n, sp.Piecewise),
                        lambda n: sp.Piecewise(*[(stabilise(v), c) for v, c in n.args]))
    families = []
    for e in sorted(expr.atoms(sp.exp), key=sp.default_sort_key):
        u = e.args[0]
        u = sp.expand(-u) if u.could_extract_minus_sign() else u
        if u not in families:
            families.append(u)
    for u in families:
        s = sp.Dummy("s", positive=True)
        plus, minus = sp.exp(u), sp.exp(sp.expand(-u))
        cand = expr.xreplace({plus: s / (1 - s), minus: (1 - s) / s})
        try:
            num, den = sp.fraction(sp.cancel(sp.together(cand)))
        except (sp.PolynomialError, TypeError, ValueError):
            continue
        out = num / den
        if any(p.exp.is_negative and p.base.has(s) for p in out.atoms(sp.Pow)) or out.has(plus, minus):
            continue            # σ below a fraction line: 1/(1 − σ) overflows where e^u did
        expr = out.xreplace({s: sigmoid(u)})
    return expr


def reuse_saved(layer: Layer, expr: sp.Expr) -> sp.Expr:
    """Read an elementwise saved tensor (σ(x), tanh(x)) instead of recomputing
    its definition, wherever the definition occurs as written (after
    ``stabilise``, so that 1/(1 + e^{−x}) and σ(x) are one form): the
    backward then uses the forward's own value."""
    for eq in layer.equations:
        t = layer.tensor(eq.target)
        if t.role is not Role.SAVED or eq.rhs.atoms(*REDUCTIONS):
            continue
        pattern = stabilise(eq.rhs)
        if pattern.is_Atom or isinstance(pattern, sp.Indexed):
            continue
        sources = [a for a in pattern.atoms(sp.Indexed) if tuple(a.indices) == tuple(eq.lhs.indices)]
        if not sources:
            continue
        src = sources[0]
        for acc in sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key):
            if acc.base != src.base:
                continue
            mapping = dict(zip(eq.lhs.indices, acc.indices))
            here = pattern.xreplace(mapping)
            expr = expr.xreplace({here: t.base[tuple(mapping[v] for v in eq.lhs.indices)]})
    return expr


# --------------------------------------------------------------------------- reductions of their own


def _reads(expr) -> set:
    return {str(a.base.label) for a in expr.atoms(sp.Indexed)}


def read_through_saved(layer: Layer, expr: sp.Expr, ranges: dict) -> sp.Expr:
    """Every read of an input that an elementwise saved tensor can be solved
    for (x = μ + x̂·√(σ² + ε)) replaced by that solution, inside sums too;
    kept only if the input is then no longer read and no more tensors are."""
    for eq in layer.equations:
        t = layer.tensor(eq.target)
        if t.role is not Role.SAVED or eq.rhs.has(sp.Sum):
            continue
        for src in eq.rhs.atoms(sp.Indexed):
            if tuple(src.indices) != tuple(eq.lhs.indices) or not expr.has(src.base):
                continue
            hole = sp.Dummy("x")
            sols = sp.solve(sp.Eq(eq.lhs, eq.rhs.xreplace({src: hole})), hole)
            if len(sols) != 1:
                continue
            subs = {acc: sols[0].xreplace(dict(zip(eq.lhs.indices, acc.indices)))
                    for acc in expr.atoms(sp.Indexed) if acc.base == src.base}
            cand = sp.expand(split_sums(simplify_indices(expr.xreplace(subs), ranges)))
            if str(src.base.label) not in _reads(cand) and len(_reads(cand)) <= len(_reads(expr)):
                expr = cand
    return expr


def _free_indices(atom: sp.Sum, lhs_indices) -> tuple:
    return tuple(v for v in lhs_indices if v in atom.free_symbols)


def _readable_sum(atom: sp.Sum, lhs_indices) -> sp.Sum:
    """The canonical sum's indices (_k0, _k1, …) named after the gradient's
    own index at the same place of a same-rank access (g_y[b, _k0, _k1, _k2]
    → c, i, j), where that name is free; else k0, k1, …."""
    used = {v.name for v in atom.free_symbols}
    names = {}
    accesses = sorted(atom.function.atoms(sp.Indexed), key=sp.default_sort_key)
    for n, (v, _, _) in enumerate(atom.limits):
        name = next((lhs_indices[p].name for acc in accesses if len(acc.indices) == len(lhs_indices)
                     for p, e in enumerate(acc.indices) if e == v), f"k{n}")
        while name in used:
            name += "2"
        used.add(name)
        names[v] = sp.Symbol(name, integer=True)
    return atom.xreplace(names)


def _coarsest_subscripts(atom: sp.Sum, free: tuple, ranges: dict) -> list[tuple]:
    """Per free index v of ``atom``: (what the gradient reads it by, the
    reduction's own index, its inclusive range).  Where v enters the sum only
    through one ⌊v/s⌋ (a per-group statistic), the reduction is indexed by
    that quotient: one value per group, not per channel."""
    out = []
    for v in free:
        nodes = {n for n in atom.atoms(sp.floor) if v in n.free_symbols}
        if len(nodes) == 1:
            (node,) = nodes
            hole = sp.Symbol(f"{v.name}_over_{quotient(node.args[0])[1]}", integer=True) \
                if quotient(node.args[0]) else None
            rng = affine_range(node, ranges)
            if hole is not None and rng is not None and v not in atom.xreplace({node: hole}).free_symbols:
                lo, hi = (simplify_index(r, {}) for r in rng)
                if not (lo.has(sp.floor, sp.Mod) or hi.has(sp.floor, sp.Mod)):
                    out.append((node, hole, (lo, hi)))
                    continue
        out.append((v, v, ranges[v]))
    return out


def extract_reductions(expr: sp.Expr, lhs_indices, ranges: dict, name: str, taken: set):
    """(expr with each sum that leaves out some of ``lhs_indices`` read from a
    tensor of its own, [(tensor, equation)] computing those tensors).

    A sum that depends on every index of the gradient (a convolution's window)
    stays where it is: there is nothing to share."""
    from vggen.frontend.lang import Equation, Tensor

    reductions, subs = [], {}
    for atom in sorted(expr.atoms(sp.Sum), key=sp.default_sort_key):
        free = _free_indices(atom, lhs_indices)
        if len(free) == len(lhs_indices) or not free or any(
                atom in other.atoms(sp.Sum) for other in expr.atoms(sp.Sum) if other is not atom):
            continue
        n = len(reductions) + 1
        while f"{name}_sum{n}" in taken:
            n += 1
        subscripts = _coarsest_subscripts(atom, free, ranges)
        body = atom.xreplace({read: own for read, own, _ in subscripts if read is not own})
        own = tuple(o for _, o, _ in subscripts)
        tensor = Tensor(f"{name}_sum{n}", tuple(hi - lo + 1 for *_, (lo, hi) in subscripts), Role.SAVED,
                        lower=tuple(lo for *_, (lo, _) in subscripts),
                        doc=f"Σ of ∂L/∂{name[2:]}, computed once per ({', '.join(map(str, own))})")
        taken.add(tensor.name)
        reductions.append((tensor, Equation(tensor.base[own], _readable_sum(body, lhs_indices),
                                            f"a reduction of ∂L/∂{name[2:]}")))
        subs[atom] = tensor.base[tuple(r for r, _, _ in subscripts)]
    return expr.xreplace(subs), reductions


# --------------------------------------------------------------------------- driver


def simplify_gradient(layer: Layer, gradients: list) -> tuple[list, list]:
    """Simplify each gradient; order them so that each reads only earlier ones.

    Returns (gradients, reductions): the reductions (tensor, equation) that
    the gradients read, to be computed before them."""
    from vggen.frontend.lang import Equation

    out, reductions = [], []
    taken = {t.name for t in layer.tensors} | {g.tensor.name for g in gradients}
    for g in gradients:
        # a step's derivative (sign', Heaviside') is 0 almost everywhere, as
        # for ReLU's mask: no gradient, like PyTorch
        rhs = g.equation.rhs.replace(lambda n: isinstance(n, sp.DiracDelta), lambda n: sp.Integer(0))
        if rhs.has(sp.Sum) and not is_pure_reduction(rhs):
            lhs_indices = g.equation.lhs.indices
            ranges = dict(zip(lhs_indices, g.tensor.index_ranges()))
            rhs = match_known_sums(layer, rhs, _known_reductions(layer, gradients, g), ranges)
            rhs = prefer_saved(layer, rhs, lhs_indices)
            if any(len(_free_indices(a, lhs_indices)) < len(lhs_indices) for a in rhs.atoms(sp.Sum)):
                rhs = read_through_saved(layer, split_sums(rhs), ranges)
                rhs, own = extract_reductions(rhs, lhs_indices, ranges, g.tensor.name, taken)
                reductions += [(t, Equation(eq.lhs, tidy(reuse_saved(layer, stabilise(eq.rhs))), eq.label))
                               for t, eq in own]
        rhs = reuse_saved(layer, stabilise(rhs))
        rhs = tidy(rhs)
        g.equation = Equation(g.equation.lhs, rhs, g.equation.label)
        out.append(g)
    names = {g.tensor.name for g in out}
    reads = lambda g: {str(a.base.label) for a in g.equation.rhs.atoms(sp.Indexed)} & names  # noqa: E731
    return sorted(out, key=lambda g: (len(reads(g)), )), reductions
