"""Evaluate equations with NumPy: the reference semantics of the front end.

Each index gets its own array axis; an access becomes a broadcast gather
(reads outside the tensor give 0), a reduction sums or maxes over the axes
of its indices.  Slow and simple on purpose: this is the oracle that the
derivation's numeric checks and the generated kernels are compared with.
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from vggen.errors import VggenError
from vggen.frontend.functions import CONSTANT_TYPES, check_functions, spec
from vggen.frontend.lang import ArgMax, Equation, Layer, ReduceMax, quotient

POW = spec(sp.Pow(sp.Symbol("x"), sp.Symbol("y")))


class _Axes:
    """Maps index symbols to broadcastable aranges, one axis per index."""

    def __init__(self):
        self.values: dict = {}
        self.ndim = 0

    def bind(self, symbols_ranges):
        """A copy with new trailing axes for (symbol, first, last) triples."""
        out = _Axes()
        out.ndim = self.ndim + len(symbols_ranges)
        for sym, arr in self.values.items():
            out.values[sym] = arr.reshape(arr.shape + (1,) * len(symbols_ranges))
        for k, (sym, first, last) in enumerate(symbols_ranges):
            shape = [1] * out.ndim
            shape[self.ndim + k] = last - first + 1
            out.values[sym] = np.arange(first, last + 1, dtype=np.int64).reshape(shape)
        return out


def _int(e, consts) -> int:
    v = sp.sympify(e).subs(consts)
    if not v.is_Integer:
        raise VggenError(f"cannot evaluate range {e}: unknown size in {v}")
    return int(v)


class Evaluator:
    """Evaluates SymPy index expressions over concrete arrays.

    ``env`` maps tensor names to arrays; ``consts`` maps size and constant
    symbols to numbers; ``lower`` maps tensor names to per-dimension first
    indices (w's i′ starts at −K).
    """

    def __init__(self, env: dict, consts: dict, lower: dict | None = None, dtype=np.float64):
        self.env = env
        self.consts = consts
        self.lower = lower or {}
        self.dtype = dtype
        self.where = ""          # the equation being evaluated, for errors

    def equation(self, eq: Equation, shape: tuple, first: tuple | None = None) -> np.ndarray:
        first = first or (0,) * len(shape)
        self.where = str(eq)
        axes = _Axes().bind([(v, f, f + n - 1) for v, f, n in zip(eq.lhs.indices, first, shape)])
        out = self.expr(eq.rhs, axes)
        return np.broadcast_to(out, shape).copy()

    def expr(self, e, axes: _Axes):
        ev = lambda a: self.expr(a, axes)  # noqa: E731
        if isinstance(e, sp.Indexed):
            return self._gather(e, axes)
        if isinstance(e, sp.Symbol):
            if e in axes.values:
                return axes.values[e]
            if e in self.consts:
                return self.consts[e]
            raise VggenError(f"no value for symbol {e}")
        if e.is_Integer:
            return int(e)
        if e.is_Number or isinstance(e, CONSTANT_TYPES):
            return float(e)
        if isinstance(e, (sp.Sum, ReduceMax, ArgMax)):
            lims = [(v, _int(lo, self.consts), _int(hi, self.consts)) for v, lo, hi in e.limits]
            inner = axes.bind(lims)
            body = self.expr(e.function, inner)
            red_shape = tuple(hi - lo + 1 for _, lo, hi in lims)
            full = np.broadcast_to(body, np.broadcast_shapes(np.shape(body), (1,) * axes.ndim + red_shape))
            red = tuple(range(axes.ndim, inner.ndim))
            if isinstance(e, sp.Sum):
                return full.sum(axis=red)
            if isinstance(e, ReduceMax):
                return full.max(axis=red)
            flat = full.reshape(full.shape[:axes.ndim] + (-1,))
            return np.argmax(flat, axis=-1)   # first maximum in row-major order
        if isinstance(e, sp.Add):
            out = 0
            for a in e.args:
                out = out + ev(a)
            return out
        if isinstance(e, sp.Mul):
            out = 1
            for a in e.args:
                out = out * ev(a)
            return out
        if isinstance(e, sp.Pow):
            base, ex = ev(e.base), e.exp
            if not (ex.is_Integer and int(ex) >= 0):
                base = np.asarray(base, dtype=self.dtype)
            return POW.numpy(base, int(ex) if ex.is_Integer else float(ex) if ex.is_Number else ev(ex))
        if isinstance(e, sp.Piecewise):
            out = None
            for val, cond in reversed(e.args):
                v = ev(val)
                out = v if out is None else np.where(ev(cond), v, out)
            return out
        if isinstance(e, sp.KroneckerDelta):
            return (ev(e.args[0]) == ev(e.args[1])).astype(np.int64)
        if isinstance(e, sp.Mod):
            return np.mod(ev(e.args[0]), ev(e.args[1]))
        if isinstance(e, sp.floor):
            q = quotient(e.args[0])
            if q is not None:
                n, d = np.asarray(ev(q[0])), np.asarray(ev(q[1]))
                if n.dtype.kind in "iu" and d.dtype.kind in "iu":
                    return np.floor_divide(n, d)      # exact: floor(i/3 + 1/3) in floats is 0 at i = 2
            return np.floor(ev(e.args[0])).astype(np.int64)
        if e is sp.true:
            return True
        if e is sp.false:
            return False
        if isinstance(e, sp.And):
            return np.logical_and.reduce(np.broadcast_arrays(*[ev(a) for a in e.args]))
        if isinstance(e, sp.Or):
            return np.logical_or.reduce(np.broadcast_arrays(*[ev(a) for a in e.args]))
        if isinstance(e, sp.Not):
            return np.logical_not(ev(e.args[0]))
        rel = {sp.GreaterThan: np.greater_equal, sp.StrictGreaterThan: np.greater,
               sp.LessThan: np.less_equal, sp.StrictLessThan: np.less,
               sp.Equality: np.equal, sp.Unequality: np.not_equal}
        if type(e) in rel:
            return rel[type(e)](ev(e.lhs), ev(e.rhs))
        f = spec(e)
        if f is not None:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return f.numpy(*[ev(a) for a in e.args])
        if isinstance(e, sp.Function):
            check_functions(e, f"equation {self.where}" if self.where else "expression")
        raise VggenError(f"the NumPy evaluator cannot evaluate {type(e).__name__}: {e}"
                         + (f" (equation {self.where})" if self.where else ""))

    def _gather(self, acc: sp.Indexed, axes: _Axes):
        name = str(acc.base.label)
        if name not in self.env:
            raise VggenError(f"no array for tensor {name} (access {acc})")
        arr = self.env[name]
        lower = self.lower.get(name, (0,) * arr.ndim)
        idx = [np.asarray(self.expr(e, axes)) for e in acc.indices]
        idx = [np.floor(ix).astype(np.int64) if ix.dtype.kind == "f" else ix for ix in idx]
        idx = [ix - lo for ix, lo in zip(idx, lower)]
        idx = np.broadcast_arrays(*idx)
        inside = np.ones(idx[0].shape, dtype=bool)
        for ix, n in zip(idx, arr.shape):
            inside &= (ix >= 0) & (ix < n)
        safe = tuple(np.where(inside, ix, 0) for ix in idx)
        return np.where(inside, arr[safe], 0)


def concrete_shape(layer: Layer, name: str, consts: dict) -> tuple:
    t = layer.tensor(name)
    return tuple(_int(n, consts) for n in t.shape)


def concrete_lower(layer: Layer, consts: dict) -> dict:
    return {t.name: tuple(_int(lo, consts) for lo in t.lower) for t in layer.tensors}


def run_forward(layer: Layer, inputs: dict, consts: dict, dtype=np.float64) -> dict:
    """Evaluate the layer's equations in order; returns every tensor by name."""
    env = dict(inputs)
    lower = concrete_lower(layer, consts)
    ev = Evaluator(env, consts, lower, dtype)
    for eq in layer.equations:
        t = layer.tensor(eq.target)
        out = ev.equation(eq, concrete_shape(layer, eq.target, consts), lower[eq.target])
        env[eq.target] = out.astype(np.int64 if t.dtype == "int" else dtype)
    return env
