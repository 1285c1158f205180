"""Analyse: reject, with a VggenError naming the access, what cannot be emitted safely.

An element written by two iterations (left-hand indices that are not
distinct plain indices, or a right-hand index bound neither on the left nor
by a declared reduction), a read of the tensor being written, a rank
mismatch, a data-dependent or non-affine index, an index or a loop bound
that is not provably an integer (``i/2``: C would print a float subscript),
an out-of-range read of a tensor that is not zero outside (a read inside a
guarded branch may rely on the guard), an unsupported SymPy node, a name
that cannot be a C identifier.  Nothing is printed before this passes.
"""

from __future__ import annotations

import itertools
import re

import sympy as sp

from vggen.compiler.symbolic import affine_index, int_valued, integer_index, proved
from vggen.errors import VggenError
from vggen.frontend.functions import CONSTANT_TYPES, FUNCTION_TYPES
from vggen.frontend.lang import (
    REDUCTIONS,
    ArgMax,
    Equation,
    ReduceMax,
    Role,
    Tensor,
    facts_of,
)

# A constant window of at most this many positions is unrolled into the body
# (VGG's 3×3 and 2×2, a 5×5 too); a larger one stays a loop.
UNROLL_LIMIT = 64

# generated locals (acc_y, v_y, best_sel, arg_sel) and helpers (vg_*) use these
_RESERVED = ("vg_", "acc_", "v_", "best_", "arg_")
_C_KEYWORDS = set("""auto break case char const continue default do double else enum extern float for
goto if inline int long register restrict return short signed sizeof static struct switch typedef
union unsigned void volatile while bool true false""".split())
# Node types the printers can emit (besides numbers, symbols and accesses).
_SUPPORTED = (sp.Add, sp.Mul, *FUNCTION_TYPES, *CONSTANT_TYPES,
              sp.Piecewise, sp.functions.elementary.piecewise.ExprCondPair, sp.KroneckerDelta, sp.floor, sp.Mod, sp.core.relational.Relational,
              sp.And, sp.Or, sp.Not, sp.Sum, ReduceMax, ArgMax)


class EquationCheck:
    """Checks one (specialised) equation; raises VggenError on the first problem."""

    def __init__(self, eq: Equation, rhs, tensors: dict, where: str):
        self.eq, self.rhs, self.tensors, self.where = eq, rhs, tensors, where
        self.sizes = set()
        for t in tensors.values():
            for e in t.shape + t.lower:
                self.sizes |= e.free_symbols

    def fail(self, msg):
        raise VggenError(f"cannot generate a kernel for {self.where}: {msg}")

    def run(self):
        lhs = self.eq.lhs
        if not isinstance(lhs, sp.Indexed):
            self.fail(f"the left-hand side {lhs} is not a tensor access")
        t = self._tensor(lhs)
        idx = tuple(lhs.indices)
        if not all(isinstance(i, sp.Symbol) for i in idx) or len(set(idx)) != len(idx):
            self.fail(f"the left-hand side {lhs} must use distinct plain indices, or two iterations "
                      f"would write one element of {t.name}")
        if not t.role.is_written:
            self.fail(f"{t.name} has role {t.role.value}; a kernel writes outputs, saved intermediates "
                      f"and gradients only")
        bound = {v.name for n in self.rhs.atoms(*REDUCTIONS) for v in n.variables}
        kinds = {"tensor": set(self.tensors), "index": {s.name for s in idx} | bound,
                 "size": {s.name for s in self.sizes}}
        for kind, names in kinds.items():
            for name in sorted(names):
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in _C_KEYWORDS \
                        or name.startswith(_RESERVED):
                    self.fail(f"{kind} name {name!r} cannot be a C identifier here (C keywords and "
                              f"the prefixes {', '.join(_RESERVED)} are taken)")
        for (k1, n1), (k2, n2) in itertools.combinations(kinds.items(), 2):
            if n1 & n2:
                self.fail(f"{sorted(n1 & n2)[0]!r} names both a {k1} and a {k2}")
        ranges = dict(zip(idx, t.index_ranges()))
        if isinstance(self.rhs, ArgMax):
            if t.dtype != "int":
                self.fail(f"an ArgMax gives a window position; {t.name} must be an int tensor")
        elif self.rhs.atoms(ArgMax):
            self.fail("an ArgMax must be the whole right-hand side")
        elif t.dtype == "int" and not int_valued(self.rhs, self.tensors):
            self.fail(f"{t.name} is an int tensor but the right-hand side is not integer-valued")
        self.visit(self.rhs, ranges, nested=False, facts=())

    def _tensor(self, acc) -> Tensor:
        name = str(acc.base.label)
        if name not in self.tensors:
            self.fail(f"access {acc}: tensor {name!r} is not declared in the layer")
        t = self.tensors[name]
        if len(acc.indices) != t.rank:
            self.fail(f"access {acc} has {len(acc.indices)} indices; {name} has rank {t.rank}")
        for n in t.shape + t.lower:          # loop bounds and offsets are printed from these
            if not integer_index(n):
                self.fail(f"{name}'s shape {t.shape} (first indices {t.lower}) holds {n}, "
                          f"which is not provably an integer")
        return t

    def visit(self, e, ranges, nested, facts):
        """``facts``: the d ≥ 0 that the enclosing guards assert."""
        if isinstance(e, sp.Indexed):
            return self.access(e, ranges, facts)
        if isinstance(e, sp.Symbol):
            if e in ranges or e in self.sizes:
                return
            if not e.is_integer:
                self.fail(f"constant {e} has no value: pass it in specialise")
            self.fail(f"index {e} is bound neither on the left-hand side nor by a reduction, so every "
                      f"value of it would write the same element of {self.eq.target} "
                      f"(declare the reduction with Sum)")
        if e.is_Number or e in (sp.true, sp.false):
            return
        if isinstance(e, REDUCTIONS):
            inner = dict(ranges)
            for v, lo, hi in e.limits:
                if v in ranges:
                    self.fail(f"reduction index {v} in {e} is already bound")
                if (lo.free_symbols | hi.free_symbols) - self.sizes:
                    self.fail(f"the range of {v} in {e} depends on another index")
                for bound in (lo, hi):
                    if not integer_index(bound) or bound.atoms(sp.Indexed):
                        self.fail(f"the loop bound {bound} of {v} in {e} is not provably an integer")
                inner[v] = (lo, hi)
            if nested and not constant_window(e):
                self.fail(f"nested reduction {e} over a run-time range")
            if isinstance(e, ArgMax) and not constant_window(e):
                self.fail(f"ArgMax {e} needs a constant window of at most {UNROLL_LIMIT} positions "
                          f"(specialise its size)")
            return self.visit(e.function, inner, True, facts)
        if not isinstance(e, _SUPPORTED):
            self.fail(f"{type(e).__name__} ({e}) has no C/CUDA form")
        if isinstance(e, sp.Piecewise):
            if e.args[-1].cond is not sp.true:
                self.fail(f"{e} has no otherwise branch (add (0, True))")
            for k, (val, cond) in enumerate(e.args):
                self.visit(cond, ranges, nested, facts)
                # the first branch runs only where its condition holds (C's ?:)
                self.visit(val, ranges, nested, facts + facts_of(cond) if k == 0 else facts)
            return
        for a in e.args:
            self.visit(a, ranges, nested, facts)

    def access(self, acc, ranges, facts=()):
        t = self._tensor(acc)
        if t.name == self.eq.target and not (t.role is Role.STATE
                                              and tuple(acc.indices) == tuple(self.eq.lhs.indices)):
            # an in-place update reads only the element its own iteration writes
            self.fail(f"access {acc} reads the tensor the equation writes")
        for pos, (e, (first, last)) in enumerate(zip(acc.indices, t.index_ranges())):
            e = sp.sympify(e)
            if e.atoms(sp.Indexed):
                self.fail(f"access {acc}: index {e} depends on tensor data")
            unbound = e.free_symbols - set(ranges) - self.sizes
            if unbound:
                self.visit(sorted(unbound, key=lambda s: s.name)[0], ranges, False, facts)
            if not integer_index(e):
                self.fail(f"access {acc}: index {e} is not provably an integer (a fraction or a "
                          f"division in a subscript)")
            if not affine_index(e, set(ranges)):
                self.fail(f"access {acc}: index {e} is not affine in the loop indices")
            if t.zero_outside:
                continue
            if not (proved(e - first, ranges, facts) and proved(last - e, ranges, facts)):
                self.fail(f"access {acc} can leave {t.name}'s range {first}..{last} in dimension {pos} "
                          f"and {t.name} is not zero outside")


def constant_window(node) -> bool:
    ext = 1
    for _, lo, hi in node.limits:
        if not (lo.is_Integer and hi.is_Integer):
            return False
        ext *= int(hi - lo + 1)
    return ext <= UNROLL_LIMIT


def check_equation(eq: Equation, rhs, tensors: dict, where: str) -> None:
    """Check ``eq`` (its right-hand side specialised as ``rhs``); ``where`` names
    it in the error."""
    EquationCheck(eq, rhs, tensors, where).run()
