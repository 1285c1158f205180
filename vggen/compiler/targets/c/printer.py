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
* float32 throughout: literals with ``f``, x**2 as a product, and an
  integer-only quotient cast to float first (``B*H*W`` must not divide as
  integers); every function through the one table of
  ``vggen.frontend.functions`` (``expf``, ``erff``, a ``vg_sigmoid``
  helper…), ``log(1 + u)`` as ``log1pf(u)``; a function outside the table is
  a VggenError, never text;
* sizes multiplied in 64 bits where 32 could overflow: a product of sizes
  in arithmetic (a mean's count, a normalisation's (CHW)²) that is not
  bounded by some tensor's element count — which the signature convention
  keeps below 2³¹ — prints as ``((long long)2*C*C*H*H)``; so do the offsets
  into a tensor whose shape alone makes it 2³¹ elements or more;
* a user's name through ``names.identifier`` (clear of the target's own).

The printer records the ``vg_*`` helpers it prints (``used``), and the
templates name theirs through it (``helper``), so that a file defines exactly
the helpers its kernels call.
"""

from __future__ import annotations

import functools

import sympy as sp
from sympy.codegen.ast import float32, real
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import PRECEDENCE

from vggen.compiler.ir import Arg
from vggen.compiler.symbolic import int_valued, proved, row_major_offset, size_symbols
from vggen.compiler.targets.names import identifier
from vggen.errors import VggenError
from vggen.frontend.functions import spec

INT32_LIMIT = 2 ** 31


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
    target = "c"           # which spelling of the function table

    def __init__(self, tensors: dict, ranges: dict | None = None, aliases: dict | None = None,
                 used: set | None = None):
        super().__init__(settings={"type_aliases": {real: float32}, "strict": True})
        self.tensors = tensors
        self.ranges = dict(ranges or {})
        self.aliases = dict(aliases or {})
        self.used = set() if used is None else used
        self.sizes = size_symbols(tensors)
        self._counts = None

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
            return f"int {identifier(arg.name)}"
        ctype = self.int_type if arg.dtype == "int32" else "float"
        const = "const " if arg.access == "read" else ""
        return f"{const}{ctype} *{self.restrict + ' ' if restrict else ''}{identifier(arg.name)}"

    @staticmethod
    def ident(name) -> str:
        """A user's name (tensor, index, size) as the code spells it."""
        return identifier(str(name))

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
        return identifier(super()._print_Symbol(expr))

    def _print_Indexed(self, expr):
        t = self.tensors[str(expr.base.label)]
        offset = row_major_offset(expr.indices, t)
        if self._beyond_int32(t):
            # every operand 64-bit, so no partial product wraps
            wide = {s: f"((long long){self._print(s)})" for s in offset.free_symbols}
            return f"{identifier(t.name)}[{self.aliased(wide)._print(offset)}]"
        return f"{identifier(t.name)}[{self._print(offset)}]"

    # ---- sizes in 64 bits
    def _beyond_int32(self, t) -> bool:
        """Whether ``t``'s shape alone (every size at 1) makes 2³¹ elements or more."""
        count = sp.Mul(*t.shape)
        return bool(count.xreplace({s: 1 for s in count.free_symbols}) >= INT32_LIMIT)

    def _size_expr(self, e) -> bool:
        """An integer expression of sizes and numbers only (no loop index)."""
        return self.is_int(e) and not e.is_Number and e.free_symbols <= self.sizes \
            and not (e.free_symbols & set(self.aliases))

    def fits_int32(self, e) -> bool:
        """Whether the integer size expression ``e`` is, for all sizes, at most
        some tensor's element count in magnitude (the convention keeps those
        below 2³¹): with each size s = 1 + s′ (s′ ≥ 0), that count minus
        ``e``'s terms taken positive has no negative coefficient."""
        e = sp.expand(e)
        if e.is_Integer:
            return abs(int(e)) < INT32_LIMIT
        if self._counts is None:
            self._counts = tuple(sorted({sp.expand(sp.Mul(*t.shape)) for t in self.tensors.values()},
                                        key=sp.default_sort_key))
        return _bounded(e, self._counts)

    def wide(self, e) -> str:
        """An integer size expression computed in 64 bits: ``((long long)2*C*C*H)``."""
        out = []
        for term in sp.Add.make_args(sp.expand(e)):
            c, rest = term.as_coeff_Mul()
            factors = [f"(long long){abs(int(c))}"] if abs(c) != 1 or rest == 1 else []
            for s, ex in sorted(_powers(rest).items(), key=lambda kv: sp.default_sort_key(kv[0])):
                factors += [self._print(s)] * ex
            if not factors[0].startswith("(long long)"):
                factors[0] = f"(long long){factors[0]}"
            text = "*".join(factors)
            out.append(("-" if c < 0 else ("+" if out else "")) + text)
        return f"({' '.join(out)})" if len(out) > 1 else f"({out[0]})"

    def _widened(self, expr):
        """``expr`` (a product) with its factors of sizes that could pass 2³¹,
        above and below the fraction line, as 64-bit products; None where
        none could."""
        if self._size_expr(expr):
            return None if self.fits_int32(expr) else self.wide(expr)
        num, den, rest = [], [], []
        for f in sp.Mul.make_args(expr):
            if f.is_Integer and f < 0:          # the sign stays outside, where C99 prints it
                rest.append(sp.Integer(-1))
                f = -f
            if self._size_expr(f) or (f.is_Integer and f != 1):
                num.append(f)
            elif f.is_Pow and f.exp.is_Integer and f.exp < 0 and self._size_expr(f.base):
                den.append(f.base ** -f.exp)
            else:
                rest.append(f)
        over = [g for g in (sp.Mul(*num), sp.Mul(*den)) if self._size_expr(g) and not self.fits_int32(g)]
        if not over:
            return None
        aliases, factors = {}, list(rest)
        integer = self.is_int(expr)             # index arithmetic stays integer (64-bit)
        for n, (group, power) in enumerate(((sp.Mul(*num), 1), (sp.Mul(*den), -1))):
            if group in over:
                ph = sp.Symbol(f"vg_size{n}", integer=integer, positive=True)     # a stand-in
                aliases[ph] = self.wide(group) if integer else f"(float){self.wide(group)}"
                factors.append(ph ** power)
            else:
                factors.append(group ** power)
        return self.aliased(aliases)._print(sp.Mul(*factors))

    # ---- numbers (float32)
    def _print_Float(self, expr):
        return f"{float(expr)!r}f"

    def _print_NumberSymbol(self, expr):
        return self._print_Float(sp.Float(expr))     # no M_PI: CUDA has no math.h

    _print_Pi = _print_Exp1 = _print_EulerGamma = _print_GoldenRatio = _print_Catalan = _print_NumberSymbol

    def _print_Rational(self, expr):
        return f"({float(expr.p)!r}f/{float(expr.q)!r}f)"

    def _print_BooleanTrue(self, expr):
        return "1"

    def _print_BooleanFalse(self, expr):
        return "0"

    # ---- arithmetic
    def _print_Pow(self, expr):
        base, ex = expr.base, expr.exp
        if ex.is_Integer and self._size_expr(base) and not self.fits_int32(base ** abs(ex)):
            text = self.wide(base ** abs(ex))
            return text if ex > 0 else f"(1.0f/(float){text})"
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
        return f"{self._function(expr)}({self._print(base)}, {self._print(sp.Float(ex) if ex.is_Rational else ex)})"

    def _print_Mul(self, expr):
        num, den = sp.fraction(expr, exact=True)
        if den != 1 and self.is_int(num) and self.is_int(den):
            # both integer: C would truncate
            return f"((float)({self._int(num)})/({self._int(den)}))"
        widened = self._widened(expr)
        return widened if widened is not None else super()._print_Mul(expr)

    def _int(self, e) -> str:
        return self.wide(e) if self._size_expr(e) and not self.fits_int32(e) else self._print(e)

    # ---- functions: the table of vggen.frontend.functions, nothing else
    def _function(self, expr, integer: bool = False) -> str:
        f = spec(expr)
        if f is None:
            raise VggenError(f"function {type(expr).__name__} ({expr}) has no {self.target.upper()} form: "
                             f"it is not in vggen.frontend.functions")
        name = f.c_int if integer and f.c_int else (f.cuda if self.target == "cuda" else f.c)
        return self.helper(name) if name.startswith("vg_") else name

    def _print_Function(self, expr):
        return f"{self._function(expr)}({', '.join(self._print(a) for a in expr.args)})"

    def _print_log(self, expr):
        arg = expr.args[0]
        if isinstance(arg, sp.Add) and sp.S.One in arg.args:
            # log(1 + u) = log1p(u): exact where u is small against 1
            return f"log1pf({self._print(arg - 1)})"
        return self._print_Function(expr)

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

    def _print_Max(self, expr):
        args = sorted(expr.args, key=sp.default_sort_key)
        out = self._print(args[-1])
        if len(args) == 1:
            return out
        f = self._function(expr, integer=all(self.is_int(a) for a in args))
        for a in reversed(args[:-1]):
            out = f"{f}({self._print(a)}, {out})"
        return out

    _print_Min = _print_Max

    def _print_Abs(self, expr):
        return f"{self._function(expr, integer=self.is_int(expr.args[0]))}({self._print(expr.args[0])})"

    _print_sign = _print_Function
    _print_Heaviside = _print_Function


@functools.lru_cache(maxsize=4096)
def _bounded(e, counts: tuple) -> bool:
    magnitude = sp.Add(*[abs(c) * m for c, m in (t.as_coeff_Mul() for t in sp.Add.make_args(e))])
    for count in counts:
        free = count.free_symbols | magnitude.free_symbols
        if not magnitude.free_symbols <= count.free_symbols:
            continue
        shift = {s: 1 + sp.Dummy(s.name, nonnegative=True) for s in free}
        diff = sp.expand((count - magnitude).xreplace(shift))
        if all(c >= 0 for c in sp.Poly(diff, *[shift[s] - 1 for s in free]).coeffs()):
            return True
    return False


def _powers(monomial) -> dict:
    """symbol → exponent of a product of powers of symbols (1: empty)."""
    return {s: int(k) for s, k in monomial.as_powers_dict().items() if not s.is_Number}


def _data_guard(cond) -> bool:
    """Whether every conjunct of ``cond`` reads tensor data (ReLU's γx̂ + β ≥ 0),
    so that none protects an out-of-range access."""
    parts = cond.args if isinstance(cond, sp.And) else (cond,)
    return all(isinstance(c, sp.core.relational.Relational) and c.atoms(sp.Indexed) for c in parts)


# SymPy's C99 printer prints every libm function it knows by itself (gamma as
# tgammaf…): route them all through the table, so that it alone decides.
for _name in ("exp exp2 expm1 log10 log2 log1p Cbrt hypot fma loggamma sin cos tan asin acos atan "
              "atan2 sinh cosh tanh asinh acosh atanh erf erfc gamma ceiling").split():
    setattr(CPrinter, f"_print_{_name}", CPrinter._print_Function)
