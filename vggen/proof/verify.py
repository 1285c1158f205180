"""Prove derived backward equations equal to the document's, and check them numerically.

Equality with a document equation is established by the strongest method
that succeeds, tried in this order:

1. ``symbolic``: for all sizes.  Both sides are put in a canonical form
   (guards as sorted ``e ≥ 0`` conjunctions, sums split into atomic sums with
   canonically named indices) and their difference expands to zero.
2. ``symbolic at sizes``: every size (B, H, K, …) set to several small
   values, every sum expanded, the difference zero at every output element.
3. ``numeric``: both sides evaluated on random inputs, including inputs drawn
   from a few values so that ties and zeros occur (ReLU at 0, equal maxima).

A difference found by (2) that involves no data-dependent branch is a
definite failure; otherwise (3) decides.  Independently of the document,
every derived gradient must pass finite differences (float64, random
inputs, small odd sizes, K = 1 and K = 2) and, where the forward is linear in
the input, the dot-product test ⟨A x, y⟩ = ⟨x, Aᵀ y⟩.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import sympy as sp

from vggen.derive.autodiff import Backward, derive
from vggen.derive.simplify import split_sums
from vggen.frontend.lang import REDUCTIONS, Equation, Layer, Role, Tensor
from vggen.frontend.layers import EPS, HO, IC, OC, WO, B, C, H, K, S, W, network_layers
from vggen.proof.document import DocEquation, document_equations
from vggen.proof.evaluate import Evaluator, concrete_lower, concrete_shape, run_forward

# Small odd sizes for the numeric checks (the max-pool input is S·HO × S·WO).
NUMERIC_SIZES = [
    {B: 3, C: 5, IC: 5, OC: 4, H: 5, W: 5, HO: 3, WO: 3, K: 1, S: 2, EPS: 2e-5},
    {B: 3, C: 5, IC: 5, OC: 4, H: 5, W: 5, HO: 3, WO: 3, K: 2, S: 2, EPS: 2e-5},
]
# Sizes at which sums are expanded symbolically.
CONCRETE_SIZES = [
    {B: 1, C: 2, IC: 2, OC: 2, H: 3, W: 3, HO: 2, WO: 2, K: 1, S: 2},
    {B: 2, C: 3, IC: 1, OC: 2, H: 4, W: 3, HO: 2, WO: 1, K: 2, S: 3},
]
DATA_BRANCHES = (sp.Piecewise, sp.KroneckerDelta, sp.Heaviside, sp.Max, sp.Min)


@dataclass
class Row:
    layer: str
    gradient: str
    equation: str | None
    method: str
    verdict: str
    detail: str = ""
    derived: str = ""
    fd_error: float | None = None
    dot_error: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- canonical forms


def _canonical_relation(rel):
    """``e ≥ 0`` (or ``e > 0`` for non-integers) with ``e`` expanded."""
    if isinstance(rel, sp.And):
        parts = sorted({_canonical_relation(a) for a in rel.args}, key=sp.srepr)
        return sp.And(*parts, evaluate=False) if len(parts) > 1 else parts[0]
    ops = {sp.GreaterThan: (1, False), sp.StrictGreaterThan: (1, True),
           sp.LessThan: (-1, False), sp.StrictLessThan: (-1, True)}
    if type(rel) not in ops:
        return rel
    sign, strict = ops[type(rel)]
    e = sp.expand(sign * (rel.lhs - rel.rhs))
    if strict and e.is_integer:
        e, strict = e - 1, False
    return sp.StrictGreaterThan(e, 0, evaluate=False) if strict else sp.GreaterThan(e, 0, evaluate=False)


def _normalise_guards(expr):
    """Piecewise((e, c), (0, True)) → e · [c] with c canonical."""
    def rewrite(pw):
        if len(pw.args) == 2 and pw.args[1].cond == sp.true and pw.args[1].expr == 0:
            val, cond = pw.args[0]
            guard = sp.Piecewise((sp.Integer(1), _canonical_relation(cond)), (sp.Integer(0), True))
            return val * guard if val != 1 else guard
        return pw
    return expr.replace(lambda n: isinstance(n, sp.Piecewise), rewrite)


def _freshen_bound(expr):
    return expr.replace(lambda n: isinstance(n, REDUCTIONS),
                        lambda n: n.xreplace({v: sp.Dummy(v.name, integer=True) for v in n.variables}))


def symbolic_equal(a, b) -> bool:
    diff = split_sums(_normalise_guards(a)) - split_sums(_normalise_guards(b))
    if sp.expand(diff) == 0:
        return True
    if diff.has(sp.Sum):
        return False
    return sp.simplify(diff) == 0


def concrete_difference(a, b, lhs, ranges: dict, sizes: dict):
    """The first nonzero a − b over all output elements at ``sizes``, else 0."""
    diff = (a - b).subs(sizes)
    axes = [range(int(lo.subs(sizes)), int(hi.subs(sizes)) + 1) for lo, hi in
            (ranges[v] for v in lhs)]
    for point in itertools.product(*axes):
        d = diff.subs(dict(zip(lhs, point))).doit()
        d = d.xreplace({acc: 0 for acc in d.atoms(sp.Indexed) if not _inside(acc, ranges, sizes)})
        d = sp.expand(d)
        if d != 0 and sp.simplify(d) != 0:
            return d
    return sp.Integer(0)


def _inside(acc, ranges, sizes) -> bool:
    name = str(acc.base.label)
    bounds = ranges.get(name)
    if bounds is None:
        return True
    for e, (lo, hi) in zip(acc.indices, bounds):
        e, lo, hi = (sp.sympify(v).subs(sizes) for v in (e, lo, hi))
        if e.is_Integer and (e < lo or e > hi):
            return False
    return True


# --------------------------------------------------------------------------- numeric


def random_inputs(layer: Layer, consts: dict, rng: np.random.Generator, discrete: bool) -> dict:
    """Random values for inputs and parameters (discrete ones make ties and zeros)."""
    out = {}
    for t in layer.tensors:
        if t.role not in (Role.INPUT, Role.PARAMETER):
            continue
        shape = concrete_shape(layer, t.name, consts)
        out[t.name] = _random(t, shape, consts, rng, discrete)
    return out


def _random(t: Tensor, shape, consts, rng, discrete):
    if t.dtype == "int":
        return rng.integers(0, int(consts.get(C, 2)), size=shape)
    if not t.differentiable:       # a dropout mask: 0 or 1/(1 − p)
        return rng.choice([0.0, 2.0], size=shape)
    if discrete:
        return rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=shape)
    return rng.standard_normal(shape)


def backward_env(bw: Backward, env: dict, consts: dict, rng) -> dict:
    """Seeds drawn at random, then every gradient evaluated in order."""
    seeds = {s.name: rng.standard_normal(concrete_shape(bw.program, s.name, consts)) for s in bw.seeds}
    return _gradients(bw, {**env, **seeds}, consts)


def _objective(layer: Layer, inputs: dict, seeds: dict, consts) -> float:
    """Σ_outputs ⟨∂L/∂y, y⟩: its gradient is what the backward computes."""
    env = run_forward(layer, inputs, consts)
    return sum(float(np.sum(seeds[f"g_{t.name}"] * env[t.name])) for t in layer.outputs)


def finite_difference_error(layer: Layer, bw: Backward, consts: dict, rng, h=1e-6) -> dict:
    """Relative error of ⟨∂L/∂A, d⟩ against a central difference, per gradient."""
    inputs = random_inputs(layer, consts, rng, discrete=False)
    env = backward_env(bw, run_forward(layer, inputs, consts), consts, rng)
    seeds = {s.name: env[s.name] for s in bw.seeds}
    errors = {}
    for g in bw.gradients:
        d = rng.standard_normal(inputs[g.of.name].shape)
        plus, minus = dict(inputs), dict(inputs)
        plus[g.of.name] = inputs[g.of.name] + h * d
        minus[g.of.name] = inputs[g.of.name] - h * d
        fd = (_objective(layer, plus, seeds, consts) - _objective(layer, minus, seeds, consts)) / (2 * h)
        an = float(np.sum(env[g.tensor.name] * d))
        errors[g.tensor.name] = abs(fd - an) / max(abs(fd), abs(an), 1e-12)
    return errors


def _gradients(bw: Backward, env: dict, consts: dict) -> dict:
    """Every gradient of ``bw`` evaluated on ``env`` (forward values and seeds), with
    the sums the program computes for them (a normalisation's reused Σ) in its order.
    A gradient's equation is taken from ``bw.gradients``, so a test that alters it
    is checked on what it altered."""
    env = dict(env)
    lower = concrete_lower(bw.program, consts)
    ev = Evaluator(env, consts, lower)
    by_target = {g.tensor.name: g.equation for g in bw.gradients}
    order = [eq.target for eq in bw.program.equations]
    order += [name for name in by_target if name not in order]
    for name in order:
        eq = by_target.get(name) or bw.program.definition(name)
        env[name] = ev.equation(eq, concrete_shape(bw.program, name, consts), lower[name])
    return env


def composition_error(layer: Layer, bw: Backward, consts: dict, rng, parts: list | None = None) -> dict:
    """For a ``chain`` of layers: relative error, per gradient, of the fused
    derivation against the parts' own derivations (``parts``: their Backwards,
    derived here if not given) run one after the other (forward through each
    part, backward through each in reverse)."""
    parts = parts if parts is not None else [derive(part) for part, _ in layer.parts]
    inputs = random_inputs(layer, consts, rng, discrete=False)
    out_name = layer.outputs[0].name
    seed = rng.standard_normal(concrete_shape(bw.program, f"g_{out_name}", consts))
    fused = _gradients(bw, {**run_forward(layer, inputs, consts), f"g_{out_name}": seed}, consts)
    envs, x = [], inputs["x"]
    for part, names in layer.parts:
        given = {n: inputs[names[n]] for n in names
                 if part.tensor(n).role in (Role.INPUT, Role.PARAMETER)}
        env = run_forward(part, {**given, "x": x}, consts)
        envs.append(env)
        x = env[part.outputs[0].name]
    composed, g = {}, seed
    for (part, names), pbw, env in zip(reversed(layer.parts), reversed(parts), reversed(envs)):
        grads = _gradients(pbw, {**env, f"g_{part.outputs[0].name}": g}, consts)
        for pg in pbw.gradients:
            if pg.of.name == "x":
                g = grads[pg.tensor.name]
            else:
                composed[f"g_{names[pg.of.name]}"] = grads[pg.tensor.name]
    composed["g_x"] = g
    errors = {}
    for grad in bw.gradients:
        a, b = fused[grad.tensor.name], composed[grad.tensor.name]
        errors[grad.tensor.name] = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
    return errors


def dot_product_error(layer: Layer, bw: Backward, consts: dict, rng) -> dict:
    """⟨y(A), gy⟩ = ⟨A, gA⟩ for each A the forward is linear in (checked first)."""
    inputs = random_inputs(layer, consts, rng, discrete=False)
    out = {}
    for g in bw.gradients:
        other = dict(inputs)
        other[g.of.name] = rng.standard_normal(inputs[g.of.name].shape)
        both = dict(inputs)
        both[g.of.name] = 2.0 * inputs[g.of.name] + 3.0 * other[g.of.name]
        ys = [run_forward(layer, v, consts) for v in (inputs, other, both)]
        linear = all(np.allclose(2 * ys[0][t.name] + 3 * ys[1][t.name], ys[2][t.name], rtol=1e-10, atol=1e-10)
                     for t in layer.outputs)
        if not linear:
            continue
        env = backward_env(bw, ys[0], consts, rng)
        lhs = sum(float(np.sum(ys[0][t.name] * env[f"g_{t.name}"])) for t in layer.outputs)
        rhs = float(np.sum(inputs[g.of.name] * env[g.tensor.name]))
        out[g.tensor.name] = abs(lhs - rhs) / max(abs(lhs), abs(rhs), 1e-12)
    return out


def numeric_difference(layer: Layer, bw: Backward, derived, doc_expr, lhs: sp.Indexed, seed=0) -> float:
    """Largest |derived − doc| over random inputs, ties and zeros included."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for consts, discrete in itertools.product(NUMERIC_SIZES, (False, True)):
        env = backward_env(bw, run_forward(layer, random_inputs(layer, consts, rng, discrete), consts),
                           consts, rng)
        lower = concrete_lower(bw.program, consts)
        ev = Evaluator(env, consts, lower)
        name = str(lhs.base.label)
        shape = concrete_shape(bw.program, name, consts)
        a = ev.equation(Equation(lhs, derived), shape, lower[name])
        b = ev.equation(Equation(lhs, doc_expr), shape, lower[name])
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
    return worst


# --------------------------------------------------------------------------- comparison


def compare(bw: Backward, doc: DocEquation) -> tuple[str, str, str]:
    """(method, verdict, detail) for one document equation against the derivation."""
    g = next(g for g in bw.gradients if g.tensor.name == doc.gradient)
    lhs = g.equation.lhs.indices
    bases = {t.base.label: t.base for t in bw.program.tensors}
    doc_expr = _freshen_bound(doc.expr).replace(
        lambda n: isinstance(n, sp.IndexedBase) and n.label in bases, lambda n: bases[n.label])
    doc_expr = doc_expr.xreplace(dict(zip(doc.lhs.indices, lhs)))
    derived = g.equation.rhs
    if symbolic_equal(derived, doc_expr):
        return "symbolic", "pass", "equal for all sizes"
    ranges = {v: r for v, r in zip(lhs, g.tensor.index_ranges())}
    ranges.update({t.name: t.index_ranges() for t in bw.program.tensors})
    definite = None
    for sizes in CONCRETE_SIZES:
        d = concrete_difference(derived, doc_expr, lhs, ranges, sizes)
        if d != 0:
            if not d.has(*DATA_BRANCHES):
                definite = f"differs at {_show(sizes)}: {d}"
            break
    else:
        return "symbolic at sizes", "pass", "equal at " + "; ".join(_show(s) for s in CONCRETE_SIZES)
    if definite:
        return "symbolic at sizes", "fail", definite
    worst = numeric_difference(bw.layer, bw, derived, doc_expr, g.equation.lhs)
    if worst > 1e-9:
        return "numeric", "fail", f"max |derived − document| = {worst:.3g}"
    return "numeric", "pass", f"max |derived − document| = {worst:.1e}"


def _show(sizes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(sizes.items(), key=lambda kv: str(kv[0])))


def check_layer(layer: Layer, docs: list[DocEquation], seed: int = 0) -> list[Row]:
    """One row per (gradient, document equation); gradients with none get one row
    (none for an in-place update such as the optimizer's: it has no backward)."""
    if not layer.differentiable_inputs:
        return []
    bw = derive(layer)
    rng = np.random.default_rng(seed)
    parts = [derive(part) for part, _ in layer.parts]
    fd, dot, comp = {}, {}, {}
    for consts in NUMERIC_SIZES:
        for name, err in finite_difference_error(layer, bw, consts, rng).items():
            fd[name] = max(fd.get(name, 0.0), err)
        for name, err in dot_product_error(layer, bw, consts, rng).items():
            dot[name] = max(dot.get(name, 0.0), err)
        if layer.parts:
            for name, err in composition_error(layer, bw, consts, rng, parts).items():
                comp[name] = max(comp.get(name, 0.0), err)
    rows = []
    for g in bw.gradients:
        numeric_ok = (fd[g.tensor.name] < 1e-5 and dot.get(g.tensor.name, 0.0) < 1e-10
                      and comp.get(g.tensor.name, 0.0) < 1e-10)
        mine = [d for d in docs if d.layer == layer.name and d.gradient == g.tensor.name]
        for d in mine or [None]:
            if d is None and layer.parts:
                method, verdict = "composition; numeric", "pass"
                detail = (f"equals {' then '.join(p.name for p, _ in reversed(layer.parts))} backward "
                          f"(max rel. difference {comp[g.tensor.name]:.1e})")
            elif d is None:
                method, verdict, detail = "derived; numeric only", "pass", "no equation in the document"
            else:
                method, verdict, detail = compare(bw, d)
            if not numeric_ok:
                verdict = "fail"
                detail += f"; finite differences {fd[g.tensor.name]:.2g}"
                if layer.parts:
                    detail += f"; composition {comp[g.tensor.name]:.2g}"
            rows.append(Row(layer.name, f"∂L/∂{g.of.name}", d.number if d else None, method, verdict,
                            detail, str(g.equation), fd[g.tensor.name], dot.get(g.tensor.name)))
    return rows


def check_all(layers: list[Layer] | None = None, docs: list[DocEquation] | None = None) -> list[Row]:
    """Every layer's rows (by default the network's layers against the document)."""
    layers = layers if layers is not None else network_layers()
    docs = docs if docs is not None else document_equations()
    rows = [row for layer in layers for row in check_layer(layer, docs)]
    return rows
