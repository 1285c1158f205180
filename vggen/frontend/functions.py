"""The closed set of functions an equation may apply to data, in one table.

Each entry says how the function is evaluated by the NumPy reference
(:mod:`vggen.proof.evaluate`, float64) and how the C and CUDA printers spell
it in float32 (:mod:`vggen.compiler.targets.c.printer`, ``cuda.printer``);
the compiler's analysis accepts exactly these (``FUNCTION_TYPES``) and
rejects any other with a VggenError naming the function and the equation,
before anything is printed.  A function that is neither a libm call nor a
CUDA device function is a ``vg_*`` helper whose definition (``helper``) the
file that calls it carries.  To add a function: one entry here.

``sigmoid`` and ``softplus`` are SymPy functions of their own, not their
exp/log expansions: their derivatives stay in σ (σ' = σ(1 − σ), softplus'
= σ), whose helpers never overflow, so a backward is no less stable than
its forward.  ``Pow`` covers ``sqrt`` (exponent ½) and integer and real
exponents; ``Heaviside`` and ``sign`` are what SymPy differentiates
``Max``/``Min`` and ``Abs`` into.  ``floor`` and ``Mod`` are index
arithmetic, printed by the printers' own rules, not data functions.
SymPy's constants (π, e: ``CONSTANT_TYPES``) are numbers to all three.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import sympy as sp

from vggen.errors import VggenError


class sigmoid(sp.Function):
    """σ(x) = 1/(1 + e^−x).  Its derivative is σ(x)(1 − σ(x))."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sp.S.Half

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return True if self.args[0].is_real else None

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))

    def _eval_evalf(self, prec):
        return self.rewrite(sp.exp)._eval_evalf(prec)


class softplus(sp.Function):
    """softplus(x) = log(1 + e^x).  Its derivative is σ(x)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sp.log(2)

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return True if self.args[0].is_real else None

    def _eval_rewrite_as_log(self, x, **kwargs):
        return sp.log(1 + sp.exp(x))

    def _eval_evalf(self, prec):
        return self.rewrite(sp.log)._eval_evalf(prec)


# --------------------------------------------------------------------------- NumPy forms (float64)


def _sigmoid(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))          # ≤ 1: nothing overflows on either side
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softplus(x):
    x = np.asarray(x, dtype=np.float64)
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def _erf(x):
    try:
        from scipy.special import erf
    except ImportError:              # scipy comes with scikit-learn; this is a fallback
        return np.vectorize(math.erf, otypes=[np.float64])(x)
    return erf(x)


def _heaviside(x, h0):
    return np.where(np.asarray(x) > 0, 1.0, np.where(np.asarray(x) < 0, 0.0, h0))


def _power(base, ex):
    """``base ** ex`` as C computes it: an integer power by products, a real one
    through powf (NaN for a negative base)."""
    if isinstance(ex, (int, np.integer)) and ex >= 0:
        return base ** int(ex)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(base, dtype=np.float64) ** np.asarray(ex, dtype=np.float64)


def _nary(op):
    return lambda *args: op.reduce(np.broadcast_arrays(*args))


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class FunctionSpec:
    """One function: its SymPy class, NumPy form, and C / CUDA spellings.

    ``c`` / ``cuda``: the float32 call; ``c_int``: the call where every
    argument is an integer (``abs``, ``vg_imin``); ``helper``: where the call
    is a ``vg_*`` helper, its definition without storage qualifiers (each
    target adds its own)."""

    name: str
    sympy: type
    numpy: Callable
    c: str
    cuda: str
    c_int: str = ""
    helper: str = ""


_HELPERS = {
    "vg_sigmoid": (
        "// σ(x) from e^−|x| ≤ 1: no overflow for any x\n"
        "float vg_sigmoid(float x) { const float e = expf(-fabsf(x)); const float s = 1.0f / (1.0f + e); "
        "return x >= 0.0f ? s : e * s; }"),
    "vg_softplus": (
        "// log(1 + e^x) = max(x, 0) + log(1 + e^−|x|): no overflow for any x\n"
        "float vg_softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }"),
    "vg_sign": "float vg_sign(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }",
    "vg_heaviside": (
        "// the step; h0 at 0 (SymPy's Heaviside(x, h0), ½ by default)\n"
        "float vg_heaviside(float x, float h0) { return x > 0.0f ? 1.0f : (x < 0.0f ? 0.0f : h0); }"),
}


def _spec(name, cls, numpy, c, c_int="", helper=False):
    return FunctionSpec(name, cls, numpy, c, c, c_int, _HELPERS[c] if helper else "")


FUNCTIONS: tuple[FunctionSpec, ...] = (
    _spec("exp", sp.exp, np.exp, "expf"),
    # log(1 + u) prints as log1pf(u) (exact for small u)
    _spec("log", sp.log, np.log, "logf"),
    # x**(1/2) prints sqrtf, small integer powers as products, the rest powf
    _spec("pow", sp.Pow, _power, "powf"),
    _spec("abs", sp.Abs, np.abs, "fabsf", c_int="abs"),
    _spec("min", sp.Min, _nary(np.minimum), "fminf", c_int="vg_imin"),
    _spec("max", sp.Max, _nary(np.maximum), "fmaxf", c_int="vg_imax"),
    _spec("tanh", sp.tanh, np.tanh, "tanhf"),
    _spec("cosh", sp.cosh, np.cosh, "coshf"),
    _spec("sinh", sp.sinh, np.sinh, "sinhf"),
    _spec("sin", sp.sin, np.sin, "sinf"),
    _spec("cos", sp.cos, np.cos, "cosf"),
    _spec("erf", sp.erf, _erf, "erff"),
    _spec("sigmoid", sigmoid, _sigmoid, "vg_sigmoid", helper=True),
    _spec("softplus", softplus, _softplus, "vg_softplus", helper=True),
    _spec("sign", sp.sign, np.sign, "vg_sign", helper=True),
    _spec("heaviside", sp.Heaviside, _heaviside, "vg_heaviside", helper=True),
)

_BY_TYPE = {f.sympy: f for f in FUNCTIONS}
FUNCTION_TYPES: tuple[type, ...] = tuple(_BY_TYPE)
# the constants (π, e, …; GELU's derivative has √(2/π)): float literals everywhere
CONSTANT_TYPES: tuple[type, ...] = (sp.NumberSymbol,)
HELPERS: dict[str, str] = {f.c: f.helper for f in FUNCTIONS if f.helper}


def spec(expr) -> FunctionSpec | None:
    """The entry of ``expr``'s function (its class or a base class), or None."""
    for cls in type(expr).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    return None


def unknown_function(expr) -> sp.Basic | None:
    """The first application in ``expr`` of a function outside the table
    (SymPy functions only: arithmetic, tensors, sums and logic are not
    functions), or None."""
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Function) and not isinstance(node, sp.Indexed) and spec(node) is None \
                and not isinstance(node, (sp.floor, sp.Mod, sp.KroneckerDelta, sp.Piecewise)):
            return node
    return None


def check_functions(expr, where: str) -> None:
    """VggenError naming the function and ``where`` (the equation) if ``expr``
    applies one outside the table."""
    bad = unknown_function(expr)
    if bad is not None:
        names = ", ".join(f.name for f in FUNCTIONS)
        raise VggenError(f"{where}: function {type(bad).__name__} ({bad}) is not one vggen evaluates "
                         f"and prints (supported: {names})")


__all__ = ["sigmoid", "softplus", "FunctionSpec", "FUNCTIONS", "FUNCTION_TYPES", "CONSTANT_TYPES", "HELPERS", "spec",
           "unknown_function", "check_functions"]
