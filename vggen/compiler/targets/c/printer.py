"""C99 printer for kernel arithmetic, built on SymPy's C99CodePrinter (CUDA's derives from it).

Everything a kernel computes goes through here; templates only place the
printed strings into loops.  What the printers add to SymPy's:

* an access ``x[b, ic, i + 1, j]`` becomes a flat row-major load with the
  tensor's first index per dimension subtracted (``w[oc, ic, di, dj]`` with
  di, dj from −K reads ``w[…(di + K)…]``); the range guards of zero-outside
  reads are already explicit ``Piecewise`` nodes in the IR;
* ``Piecewise`` → ``?:``; one whose condition reads data (a ReLU mask) →
  ``vg_select(c, a, b)``, both branches evaluated, so a blend instead of a
  branch; ``KroneckerDelta(a, b)`` → ``(a == b)``;
* ``floor(n/d)`` and ``Mod(n, d)`` on integers → ``/`` and ``%`` where the
  kernel's loop ranges prove n ≥ 0 (C's division truncates, which equals
  floor only there), else the ``vg_floordiv``/``vg_mod`` helpers;
* float32 throughout: ``expf``, ``logf``, ``sqrtf``, literals with ``f``,
  x**2 as a product, and an integer-only quotient cast to float first
  (``B*H*W`` must not divide as integers).

The printer records the ``vg_*`` helpers it prints (``used``), and the
templates name theirs through it (``helper``), so that a file defines exactly
the helpers its kernels call.
"""

from __future__ import annotations

import sympy as sp
from sympy.codegen.ast import float32, real
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import PRECEDENCE

from vggen.compiler.ir import Arg
from vggen.compiler.symbolic import int_valued, proved, row_major_offset


class CPrinter(C99CodePrinter):
    """Prints one kernel's expressions as C99 (float32).

    ``tensors``: name → specialised Tensor (shape, lower, dtype);
    ``ranges``: loop variable → inclusive (first, last), for the proofs that
    pick plain ``/`` and ``%``; ``aliases``: symbol → text (an accumulator
    that lives in an array); ``used``: the helpers printed so far (shared
    with the printers ``aliased`` derives).
    """

    restrict = "restrict"
    int_type = "int32_t"
    neg_inf = "-INFINITY"

    def __init__(self, tensors: dict, ranges: dict | None = None, aliases: dict | None = None,
                 used: set | None = None):
        super().__init__(settings={"type_aliases": {real: float32}, "strict": True})
        self.tensors = tensors
        self.ranges = dict(ranges or {})
        self.aliases = dict(aliases or {})
        self.used = set() if used is None else used

    # ---- entry points
    def code(self, expr) -> str:
        """One expression, one line."""
        return self._print(sp.sympify(expr))

    def wrapped(self, expr, indent: str = "    ", width: int = 100) -> str:
        """A long sum with one term per line (the unrolled 3×3 window)."""
        expr = sp.sympify(expr)
        flat = self.code(expr)
        if not isinstance(expr, sp.Add) or len(flat) <= width:
            return flat
        terms = self._as_ordered_terms(expr, order=None)
        out = self._print(terms[0])
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                out += f"\n{indent}- {self.parenthesize(-t, PRECEDENCE['Add'])}"
            else:
                out += f"\n{indent}+ {self.parenthesize(t, PRECEDENCE['Add'])}"
        return out

    def aliased(self, aliases: dict) -> "CPrinter":
        """This printer with more symbols printed as given text (e.g. an
        accumulator read from a packed block)."""
        return type(self)(self.tensors, self.ranges, {**self.aliases, **aliases}, self.used)

    def helper(self, name: str) -> str:
        """``name``, a ``vg_*`` helper the code calls, recorded as used."""
        self.used.add(name)
        return name

    def param(self, arg: Arg, restrict: bool = True) -> str:
        """The C parameter declaration of one signature entry."""
        if arg.kind == "size":
            return f"int {arg.name}"
        ctype = self.int_type if arg.dtype == "int32" else "float"
        const = "const " if arg.access == "read" else ""
        return f"{const}{ctype} *{self.restrict + ' ' if restrict else ''}{arg.name}"

    def params(self, args, restrict: bool = True) -> str:
        """The whole parameter list, in signature order."""
        return ", ".join(self.param(a, restrict) for a in args)

    def ctype(self, symbol) -> str:
        return "int" if symbol.is_integer else "float"

    def is_int(self, expr) -> bool:
        return int_valued(sp.sympify(expr), self.tensors)

    # ---- accesses and symbols
    def _print_Symbol(self, expr):
        if expr in self.aliases:
            return self.aliases[expr]
        return super()._print_Symbol(expr)

    def _print_Indexed(self, expr):
        t = self.tensors[str(expr.base.label)]
        return f"{t.name}[{self._print(row_major_offset(expr.indices, t))}]"

    # ---- numbers (float32)
    def _print_Float(self, expr):
        return f"{float(expr)!r}f"

    def _print_Rational(self, expr):
        return f"({float(expr.p)!r}f/{float(expr.q)!r}f)"

    def _print_BooleanTrue(self, expr):
        return "1"

    def _print_BooleanFalse(self, expr):
        return "0"

    # ---- arithmetic
    def _print_Pow(self, expr):
        base, ex = expr.base, expr.exp
        b = self.parenthesize(base, PRECEDENCE["Mul"] + 1)
        if ex == -1:
            return f"1.0f/{b}"
        if ex == sp.Rational(1, 2):
            return f"sqrtf({self._print(base)})"
        if ex == -sp.Rational(1, 2):
            return f"(1.0f/sqrtf({self._print(base)}))"
        if ex.is_Integer and 2 <= ex <= 4:
            return "(" + "*".join([b] * int(ex)) + ")"
        if ex.is_Integer and -4 <= ex <= -2:
            return "(1.0f/(" + "*".join([b] * int(-ex)) + "))"
        return f"powf({self._print(base)}, {self._print(sp.Float(ex) if ex.is_Rational else ex)})"

    def _print_Mul(self, expr):
        num, den = sp.fraction(expr, exact=True)
        if den != 1 and self.is_int(num) and self.is_int(den):
            # both integer: C would truncate
            return f"((float)({self._print(num)})/({self._print(den)}))"
        return super()._print_Mul(expr)

    def _print_Piecewise(self, expr):
        if expr.args[-1].cond is not sp.true:
            raise ValueError(f"Piecewise without an otherwise branch: {expr}")
        if len(expr.args) == 2 and _data_guard(expr.args[0].cond):
            # both branches evaluated, then chosen: a blend, not a branch the
            # data would make unpredictable (a ReLU mask); safe because the
            # condition guards no index (range guards stay ?:)
            (val, cond), (other, _) = expr.args
            return f"{self.helper('vg_select')}({self._print(cond)}, {self._print(val)}, {self._print(other)})"
        out = self._print(expr.args[-1].expr)
        for val, cond in reversed(expr.args[:-1]):
            out = f"(({self._print(cond)}) ? {self._atom(val)} : {out})"
        return out

    def _print_KroneckerDelta(self, expr):
        a, b = expr.args
        return f"({self._print(a)} == {self._print(b)})"

    def _atom(self, e) -> str:
        """``e`` printed, in parentheses unless it is a number, symbol or access."""
        text = self._print(e)
        return text if isinstance(e, (sp.Symbol, sp.Indexed)) or (e.is_Number and e >= 0) else f"({text})"

    def _nonneg(self, e) -> bool:
        return proved(sp.expand(e), self.ranges)

    def _print_floor(self, expr):
        arg = expr.args[0]
        num, den = sp.fraction(sp.together(arg))
        if self.is_int(num) and den.is_integer and den.is_positive:
            if den == 1:
                return self._print(num)
            if self._nonneg(num):
                return f"(({self._print(num)})/{self._atom(den)})"
            return f"{self.helper('vg_floordiv')}({self._print(num)}, {self._print(den)})"
        return f"floorf({self._print(arg)})"

    def _print_Mod(self, expr):
        a, m = expr.args
        if self.is_int(a) and m.is_integer and m.is_positive:
            if self._nonneg(a):
                return f"(({self._print(a)}) % {self._atom(m)})"
            return f"{self.helper('vg_mod')}({self._print(a)}, {self._print(m)})"
        return f"fmodf({self._print(a)}, {self._print(m)})"

    def _minmax(self, expr, fint, ffloat):
        args = sorted(expr.args, key=sp.default_sort_key)
        out = self._print(args[-1])
        if len(args) == 1:
            return out
        f = self.helper(fint) if all(self.is_int(a) for a in args) else ffloat
        for a in reversed(args[:-1]):
            out = f"{f}({self._print(a)}, {out})"
        return out

    def _print_Max(self, expr):
        return self._minmax(expr, "vg_imax", "fmaxf")

    def _print_Min(self, expr):
        return self._minmax(expr, "vg_imin", "fminf")

    def _print_Abs(self, expr):
        if self.is_int(expr.args[0]):
            return f"abs({self._print(expr.args[0])})"
        return f"fabsf({self._print(expr.args[0])})"


def _data_guard(cond) -> bool:
    """Whether every conjunct of ``cond`` reads tensor data (ReLU's γx̂ + β ≥ 0),
    so that none protects an out-of-range access."""
    parts = cond.args if isinstance(cond, sp.And) else (cond,)
    return all(isinstance(c, sp.core.relational.Relational) and c.atoms(sp.Indexed) for c in parts)
