"""The index-notation front end: tensors, indices, reductions, equations, layers.

A layer is a list of equations ``lhs(indices) = rhs`` in the document's
notation.  Everything is plain SymPy underneath: an access ``x[b, ic, i+di,
j+dj]`` is a ``sympy.Indexed``, a sum is a ``sympy.Sum`` (inclusive bounds, as
SymPy has them), sizes and indices are integer symbols.  ``Layer`` runs the
analysis that rejects an equation before anything is derived or generated
from it: unknown tensors, wrong arity, unbound indices, and accesses that can
leave their tensor's range where the tensor does not declare the document's
zero-outside semantics.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

import sympy as sp
from sympy.concrete.expr_with_limits import ExprWithLimits

from vggen.errors import VggenError

# --------------------------------------------------------------------------- symbols


def sizes(names: str) -> tuple[sp.Symbol, ...]:
    """Positive integer size symbols: ``B, IC, H, W = sizes("B IC H W")``."""
    return tuple(sp.symbols(names, integer=True, positive=True, seq=True))


def indices(names: str) -> tuple[sp.Symbol, ...]:
    """Integer index symbols (their ranges come from where they are bound)."""
    return tuple(sp.symbols(names, integer=True, seq=True))


def Sum(body, *limits) -> sp.Sum:
    """Σ over half-open ranges ``(index, lo, hi)``: lo ≤ index < hi."""
    return sp.Sum(body, *[(v, lo, hi - 1) for v, lo, hi in limits])


class ReduceMax(ExprWithLimits):
    """max over the limits (inclusive bounds, like ``sympy.Sum``)."""

    def _latex(self, printer):
        lim = ", ".join(f"{printer._print(lo)} \\le {printer._print(v)} \\le {printer._print(hi)}"
                        for v, lo, hi in self.limits)
        return f"\\max_{{{lim}}} {printer._print(self.function)}"


class ArgMax(ExprWithLimits):
    """Row-major position of the first maximum over the limits.

    With limits (p, 0, S-1), (q, 0, S-1) the value is S*p + q of the first
    (p, q) in row-major order where the body is largest: the tie rule that
    completes eq. 55.
    """

    def _latex(self, printer):
        lim = ", ".join(printer._print(v) for v in self.variables)
        return f"\\operatorname{{argmax}}^{{\\mathrm{{first}}}}_{{{lim}}} {printer._print(self.function)}"


def Max(body, *limits) -> ReduceMax:
    return ReduceMax(body, *[(v, lo, hi - 1) for v, lo, hi in limits])


def Argmax(body, *limits) -> ArgMax:
    return ArgMax(body, *[(v, lo, hi - 1) for v, lo, hi in limits])


REDUCTIONS = (sp.Sum, ReduceMax, ArgMax)


def iverson(cond) -> sp.Expr:
    """[cond]: 1 where cond holds, else 0 (a range or parity guard)."""
    return sp.Piecewise((sp.Integer(1), cond), (sp.Integer(0), True))


# --------------------------------------------------------------------------- tensors


class Role(enum.Enum):
    INPUT = "input"            # data flowing in (x, labels, the dropout mask)
    PARAMETER = "parameter"    # learned (w, γ, β)
    OUTPUT = "output"          # what the layer hands on (y, the loss)
    SAVED = "saved"            # intermediate computed forward, kept for backward
    GRADIENT = "gradient"      # ∂L/∂(something), made by the derivation
    STATE = "state"            # read and overwritten in place, element by element (an optimizer's p, v)

    @property
    def is_computed(self) -> bool:
        """Made by the layer's equations from the others (never given by the caller)."""
        return self in (Role.OUTPUT, Role.SAVED, Role.GRADIENT)

    @property
    def is_written(self) -> bool:
        """May stand on an equation's left-hand side: computed, or state updated in place."""
        return self.is_computed or self is Role.STATE


@dataclass(frozen=True, eq=False)
class Tensor:
    """A named array with a symbolic shape.

    ``zero_outside``: reads outside the shape give 0 (the document's
    "elements whose indices underflow or overflow are zero").
    ``differentiable=False``: no gradient flows into it (labels, masks,
    the max-pool selection, a stabilising shift).
    """

    name: str
    shape: tuple
    role: Role
    zero_outside: bool = False
    lower: tuple = ()          # first index per dimension (w's i′ runs from −K); default 0
    dtype: str = "float"
    differentiable: bool = True
    doc: str = ""
    base: sp.IndexedBase = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(sp.sympify(s) for s in self.shape))
        lower = self.lower or (0,) * len(self.shape)
        object.__setattr__(self, "lower", tuple(sp.sympify(s) for s in lower))
        object.__setattr__(self, "base", sp.IndexedBase(self.name, shape=self.shape))
        if self.dtype not in ("float", "int"):
            raise VggenError(f"tensor {self.name}: dtype must be 'float' or 'int', not {self.dtype!r}")
        if self.dtype == "int":
            object.__setattr__(self, "differentiable", False)

    @property
    def rank(self) -> int:
        return len(self.shape)

    def index_ranges(self) -> list[tuple]:
        """Inclusive (first, last) index per dimension."""
        return [(lo, lo + n - 1) for lo, n in zip(self.lower, self.shape)]

    def __getitem__(self, idx) -> sp.Indexed:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) != self.rank:
            shown = ", ".join(str(i) for i in idx)
            raise VggenError(f"access {self.name}[{shown}] has {len(idx)} indices; "
                             f"{self.name} has rank {self.rank} (shape {self.shape})")
        return self.base[idx]

    def __repr__(self):
        return f"Tensor({self.name}, {self.shape}, {self.role.value})"


def gradient_tensor(t: Tensor) -> Tensor:
    """∂L/∂t: same shape; zero outside, so shifted reads of it are guarded gathers."""
    return Tensor(f"g_{t.name}", t.shape, Role.GRADIENT, zero_outside=True,
                  lower=t.lower, doc=f"∂L/∂{t.name}")


# --------------------------------------------------------------------------- equations


@dataclass(frozen=True, eq=False)
class Equation:
    """``lhs = rhs`` with ``lhs`` an access by distinct plain indices."""

    lhs: sp.Indexed
    rhs: sp.Expr
    label: str = ""      # the document's number, e.g. "eq. 1"

    @property
    def target(self) -> str:
        return str(self.lhs.base.label)

    @property
    def lhs_indices(self) -> tuple[sp.Symbol, ...]:
        return tuple(self.lhs.indices)

    def __str__(self):
        return f"{self.lhs} = {self.rhs}"


def accesses(expr) -> list[sp.Indexed]:
    """Every tensor access in ``expr``, in a stable order."""
    return sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key)


def reduction_limits(node) -> list[tuple]:
    """(index, lo, hi) inclusive, for Sum / ReduceMax / ArgMax nodes."""
    return [tuple(lim) for lim in node.limits]


# --------------------------------------------------------------------------- index arithmetic
#
# The one range analysis of vggen: the front end's access checks, the
# derivation's inversions and guards and the compiler's proofs
# (vggen.compiler.symbolic) all ask these, so that a fact about an index is
# decided the same way everywhere.


def _positive_int(d, idx: set) -> bool:
    """A divisor that is a positive integer and no index (2, S, 2·S)."""
    d = sp.sympify(d)
    return bool(d.is_integer and d.is_positive) and not (d.free_symbols & idx)


def quotient(arg) -> tuple | None:
    """(N, d) with ``arg = N/d``, d a positive integer and N free of fractions
    (``floor`` keeps its argument as SymPy writes it: ``i/2 + 1/2``); else None."""
    num, den = sp.fraction(sp.together(sp.sympify(arg)))
    if not (den.is_integer and den.is_positive):
        return None
    return sp.expand(num), den


def _outer_nodes(e, idx: set):
    """floor/Mod nodes of ``e`` that involve an index, outermost only."""
    if isinstance(e, (sp.floor, sp.Mod)) and e.free_symbols & idx:
        yield e
        return
    for a in e.args:
        yield from _outer_nodes(a, idx)


def _node_range(node, ranges: dict):
    idx = set(ranges)
    if isinstance(node, sp.floor):
        q = quotient(node.args[0])
        if q is None or not _positive_int(q[1], idx):
            return None
        inner = affine_range(q[0], ranges)
        # floor is monotone: it maps the numerator's range
        return None if inner is None else tuple(sp.simplify(sp.floor(sp.expand(e / q[1]))) for e in inner)
    n, d = node.args
    if not _positive_int(d, idx):
        return None
    inner = affine_range(n, ranges)
    if inner is not None and provably(inner[0] >= 0) and provably(inner[1] <= d - 1):
        return inner                       # within one period: Mod is the identity
    return sp.Integer(0), d - 1


def affine_range(expr, ranges: dict) -> tuple | None:
    """Inclusive [lo, hi] of an integer index expression, or None where it
    cannot be bounded.

    ``ranges`` maps index symbols to inclusive (lo, hi).  The expression is
    affine in those indices (coefficients may be symbolic, a stride S, as
    long as their sign is known), where a term may also be ``floor(N/d)`` or
    ``Mod(N, d)`` of such an N by a positive integer d: floor maps N's range,
    Mod spans [0, d − 1] (N's own range where that lies inside one period).
    Each such term is bounded on its own, so the bound is safe, not always
    tight (⌊N/2⌋ and N mod 2 are not correlated).
    """
    expr = sp.sympify(expr)
    idx = set(ranges)
    nodes = sorted(set(_outer_nodes(expr, idx)), key=sp.default_sort_key)
    if nodes:
        ranges = dict(ranges)
        subs = {}
        for node in nodes:
            rng = _node_range(node, ranges)
            if rng is None:
                return None
            subs[node] = sp.Dummy("t", integer=True)
            ranges[subs[node]] = rng
        expr = expr.xreplace(subs)
        idx = set(ranges)
    lo = hi = sp.Integer(0)
    for term in sp.Add.make_args(sp.expand(expr)):
        vars_in = term.free_symbols & idx
        if not vars_in:
            lo += term
            hi += term
            continue
        if len(vars_in) > 1:
            return None
        (v,) = vars_in
        coeff, rest = term.as_independent(v, as_Add=False)
        if rest != v:
            return None
        vlo, vhi = ranges[v]
        if coeff.is_nonnegative:
            lo += coeff * vlo
            hi += coeff * vhi
        elif coeff.is_nonpositive:
            lo += coeff * vhi
            hi += coeff * vlo
        else:
            return None
    return sp.expand(lo), sp.expand(hi)


def provably(cond) -> bool:
    """True only when SymPy can show ``cond`` (a relational over sizes) holds."""
    if cond is sp.true or cond is True:
        return True
    if isinstance(cond, sp.core.relational.Relational):
        diff = sp.simplify(cond.lhs - cond.rhs)
        if isinstance(cond, (sp.GreaterThan,)):
            return bool(diff.is_nonnegative)
        if isinstance(cond, (sp.LessThan,)):
            return bool(diff.is_nonpositive)
        if isinstance(cond, sp.StrictGreaterThan):
            return bool(diff.is_positive)
        if isinstance(cond, sp.StrictLessThan):
            return bool(diff.is_negative)
    return False


def nonneg(rel):
    """d with ``rel ⟺ d ≥ 0`` for an inequality of index arithmetic (no tensor
    data, integer symbols); None otherwise.  SymPy rewrites ``Ge(d, 0)`` as it
    likes (``H - i >= 2``, ``-H + i <= -1``), so relationals are compared by
    this, never by form."""
    if not isinstance(rel, sp.core.relational.Relational) or rel.atoms(sp.Indexed) \
            or not all(s.is_integer for s in rel.free_symbols):
        return None
    d = sp.expand(rel.lhs - rel.rhs)
    if not integer_index(d):          # i/2 < H: the strict form's −1 would be wrong
        return None
    if isinstance(rel, sp.GreaterThan):
        return d
    if isinstance(rel, sp.StrictGreaterThan):
        return d - 1
    if isinstance(rel, sp.LessThan):
        return -d
    if isinstance(rel, sp.StrictLessThan):
        return -d - 1
    return None


def facts_of(cond) -> tuple:
    """The d ≥ 0 that a guard's conjuncts assert (what holds inside its branch)."""
    parts = cond.args if isinstance(cond, sp.And) else (cond,)
    return tuple(d for d in map(nonneg, parts) if d is not None)


def proves_nonneg(d, ranges: dict, facts=()) -> bool:
    """``d ≥ 0`` for every value of the indices in ``ranges`` where each fact
    f ≥ 0 holds: d's range, or that of d − f for one fact f, is nonnegative."""
    for f in (0, *facts):
        rng = affine_range(sp.expand(d - f), ranges)
        if rng is not None and provably(rng[0] >= 0):
            return True
    return False


def integer_index(e) -> bool:
    """Whether ``e`` is integer arithmetic that prints as such: integers and
    integer symbols under +, ×, nonnegative powers, Max/Min, floor(N/d) and
    Mod(N, d) by a positive integer d (a tensor read counts: whether data may
    index is decided elsewhere).  ``i/2`` is not, however it is guarded."""
    e = sp.sympify(e)
    if e.is_Number:
        return bool(e.is_Integer)
    if isinstance(e, (sp.Symbol, sp.Indexed)):
        return isinstance(e, sp.Indexed) or bool(e.is_integer)
    if isinstance(e, (sp.Add, sp.Mul, sp.Max, sp.Min)):
        return all(integer_index(a) for a in e.args)
    if isinstance(e, sp.Pow):
        return integer_index(e.base) and e.exp.is_Integer and e.exp >= 0
    if isinstance(e, sp.floor):
        q = quotient(e.args[0])
        return q is not None and integer_index(q[0]) and integer_index(q[1])
    if isinstance(e, sp.Mod):
        return integer_index(e.args[0]) and integer_index(e.args[1]) and bool(e.args[1].is_positive)
    return False


# --------------------------------------------------------------------------- layers


@dataclass(eq=False)
class Layer:
    """A layer: its tensors and its forward equations, in evaluation order.

    Construction validates every equation (see module docstring); a bad
    equation raises VggenError naming the offending access.
    """

    name: str
    tensors: list[Tensor]
    equations: list[Equation]
    constants: dict = field(default_factory=dict)   # symbol -> default value (ε)
    doc: str = ""
    # chain(): per fused layer, in order, (layer, its tensor name → this layer's
    # name), the fed x and the inner outputs left out; else empty
    parts: tuple = ()
    # "forward", or "backward" for a derived program (named "<forward's name> backward")
    direction: str = "forward"

    def __post_init__(self):
        self.by_name = {t.name: t for t in self.tensors}
        if len(self.by_name) != len(self.tensors):
            raise VggenError(f"layer {self.name}: two tensors share a name")
        for eq in self.equations:
            self._validate(eq)

    # ---- queries
    def tensor(self, name: str) -> Tensor:
        return self.by_name[name]

    def role(self, role: Role) -> list[Tensor]:
        return [t for t in self.tensors if t.role is role]

    @property
    def size_symbols(self) -> set:
        out = set()
        for t in self.tensors:
            for s in t.shape + t.lower:
                out |= s.free_symbols
        for eq in self.equations:
            for node in eq.rhs.atoms(*REDUCTIONS):
                for _, lo, hi in node.limits:
                    out |= (lo.free_symbols | hi.free_symbols)
        return out - {v for eq in self.equations for v in _bound_indices(eq)}

    @property
    def differentiable_inputs(self) -> list[Tensor]:
        return [t for t in self.tensors
                if t.role in (Role.INPUT, Role.PARAMETER) and t.differentiable]

    @property
    def outputs(self) -> list[Tensor]:
        return self.role(Role.OUTPUT)

    @property
    def forward_name(self) -> str:
        """The forward layer's name: this one's, or the layer a backward program was derived from."""
        suffix = " " + self.direction
        return self.name[: -len(suffix)] if self.direction == "backward" and self.name.endswith(suffix) \
            else self.name

    def with_given(self, names) -> "Layer":
        """The same layer with the intermediates ``names`` supplied by the caller
        instead of computed: their equations are dropped and they become inputs
        (BatchNormalization at evaluation: μ and σ² are the running statistics)."""
        names = set(names)
        tensors = [dataclasses.replace(t, role=Role.INPUT) if t.name in names else t
                   for t in self.tensors]
        return Layer(self.name, tensors, [eq for eq in self.equations if eq.target not in names],
                     constants=self.constants, doc=self.doc, parts=self.parts, direction=self.direction)

    def definition(self, name: str) -> Equation | None:
        for eq in self.equations:
            if eq.target == name:
                return eq
        return None

    # ---- analysis
    def _validate(self, eq: Equation):
        where = f"in {eq.label or 'equation'} of {eq.lhs.base.label} ({self.name})"
        if not isinstance(eq.lhs, sp.Indexed):
            raise VggenError(f"left-hand side {eq.lhs} {where} is not a tensor access")
        for acc in [eq.lhs] + accesses(eq.rhs):
            name = str(acc.base.label)
            if name not in self.by_name:
                raise VggenError(f"access {acc} {where}: tensor {name!r} is not declared in layer {self.name}")
            t = self.by_name[name]
            if len(acc.indices) != t.rank:
                raise VggenError(f"access {acc} {where} has {len(acc.indices)} indices; "
                                 f"{name} has rank {t.rank}")
        lhs_t = self.by_name[eq.target]
        if not lhs_t.role.is_written:
            raise VggenError(f"{eq.lhs} {where}: {eq.target} is a {lhs_t.role.value}, not an output or intermediate")
        lhs_idx = eq.lhs.indices
        if not all(isinstance(i, sp.Symbol) for i in lhs_idx) or len(set(lhs_idx)) != len(lhs_idx):
            raise VggenError(f"left-hand side {eq.lhs} {where} must use distinct plain indices")
        for acc in accesses(eq.rhs):
            if str(acc.base.label) == eq.target and (lhs_t.role is not Role.STATE
                                                     or tuple(acc.indices) != tuple(lhs_idx)):
                raise VggenError(f"access {acc} {where} reads the tensor being written: only a state "
                                 f"tensor, and only its element {eq.lhs}, may be (an in-place update)")
        ranges = dict(zip(lhs_idx, lhs_t.index_ranges()))
        size_syms = set()
        for t in self.tensors:
            for s in t.shape + t.lower:
                size_syms |= s.free_symbols
        size_syms |= set(self.constants)
        self._check_expr(eq.rhs, ranges, size_syms, where, (), eq)

    def _check_expr(self, expr, ranges, size_syms, where, facts=(), eq=None):
        """``facts``: the d ≥ 0 that enclosing guards assert (a read they dominate
        may rely on them); ``eq``: the equation, named where an index is bad."""
        if isinstance(expr, sp.Indexed):
            self._check_access(expr, ranges, size_syms, where, facts, eq)
            return
        if isinstance(expr, REDUCTIONS):
            inner = dict(ranges)
            for v, lo, hi in expr.limits:
                for bound in (lo, hi):
                    if not integer_index(bound):
                        raise VggenError(f"the range of {v} in {expr} {where} has the bound {bound}, "
                                         f"which is not provably an integer (in {eq})")
                inner[v] = (lo, hi)
            self._check_expr(expr.function, inner, size_syms, where, facts, eq)
            return
        if isinstance(expr, sp.Symbol):
            if expr not in ranges and expr not in size_syms:
                raise VggenError(f"symbol {expr} {where} is neither an index bound on the left "
                                 f"or by a sum, nor a size or constant of the layer")
            return
        if isinstance(expr, sp.Piecewise):
            for k, (val, cond) in enumerate(expr.args):
                self._check_expr(cond, ranges, size_syms, where, facts, eq)
                # only the first branch knows its condition holds (the others, its negation)
                inside = facts + facts_of(cond) if k == 0 else facts
                self._check_expr(val, ranges, size_syms, where, inside, eq)
            return
        for arg in expr.args:
            if isinstance(arg, sp.Basic):
                self._check_expr(arg, ranges, size_syms, where, facts, eq)

    def _check_access(self, acc, ranges, size_syms, where, facts=(), eq=None):
        t = self.by_name[str(acc.base.label)]
        for pos, (e, (first, last)) in enumerate(zip(acc.indices, t.index_ranges())):
            for s in sp.sympify(e).free_symbols:
                if s not in ranges and s not in size_syms:
                    raise VggenError(f"access {acc} {where}: index {s} is bound neither on the "
                                     f"left-hand side nor by a sum")
            if not integer_index(e):
                raise VggenError(f"access {acc} {where}: index {e} is not provably an integer "
                                 f"(a fraction or a division left in a subscript), in {eq}")
            if t.zero_outside:
                continue
            inside = proves_nonneg(e - first, ranges, facts) and proves_nonneg(last - e, ranges, facts)
            if not inside:
                rng = affine_range(e, ranges)
                span = f"[{rng[0]}, {rng[1]}]" if rng else "an unknown range"
                raise VggenError(f"access {acc} {where} can leave the range of {t.name} in "
                                 f"dimension {pos}: {e} spans {span}, {t.name} has {first}..{last}; "
                                 f"declare {t.name} zero_outside if that is meant")


def chain(name: str, *parts: Layer) -> Layer:
    """``parts`` applied in sequence, fused into one layer.

    Part k's single output feeds part k+1's input ``x`` (same shape).  Where
    that output's definition is elementwise (no reduction) it is substituted
    into the next part's reads, so the value never goes through memory (BN's
    γx̂ + β inside ReLU); otherwise it stays as a saved intermediate
    ``<output><k>``.  Other tensors keep their names (a clash gets the part's
    number appended).  The fused layer is an ordinary layer: ``derive`` gives
    its backward (the ReLU mask inside BN's reductions), the generator its
    kernels, with no template of its own.
    """
    if len(parts) < 2:
        raise VggenError(f"chain {name}: needs at least two layers, got {len(parts)}")
    tensors: dict[str, Tensor] = {}
    equations: list[Equation] = []
    constants: dict = {}
    feed: Equation | Tensor | None = None      # what part k's x becomes
    joined = []
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        if len(part.outputs) != 1:
            raise VggenError(f"chain {name}: {part.name} has {len(part.outputs)} outputs; "
                             f"only a layer with one output can feed the next")
        out = part.outputs[0]
        constants.update(part.constants)
        names: dict[str, str] = {}
        if k > 0:
            if "x" not in part.by_name:
                raise VggenError(f"chain {name}: {part.name} has no input x to take "
                                 f"{parts[k - 1].name}'s output")
            given = feed.lhs.base.label if isinstance(feed, Equation) else feed.name
            prev_shape = feed.shape if isinstance(feed, Tensor) else parts[k - 1].outputs[0].shape
            if tuple(part.tensor("x").shape) != tuple(prev_shape):
                raise VggenError(f"chain {name}: {parts[k - 1].name}'s output {given} has shape "
                                 f"{prev_shape}, {part.name}'s x has {part.tensor('x').shape}")
        for t in part.tensors:
            if k > 0 and t.name == "x":
                continue
            if t is out and not last:
                continue
            new = t.name
            if new in tensors:
                new = f"{t.name}{k}"
            if new in tensors:
                raise VggenError(f"chain {name}: cannot name {part.name}'s {t.name} uniquely")
            names[t.name] = new
            tensors[new] = dataclasses.replace(t, name=new)

        def rename(expr, feed=feed):
            reps = {}
            for acc in expr.atoms(sp.Indexed):
                n = str(acc.base.label)
                if k > 0 and n == "x":
                    if isinstance(feed, Equation):
                        reps[acc] = feed.rhs.xreplace(dict(zip(feed.lhs.indices, acc.indices)))
                    else:
                        reps[acc] = feed.base[acc.indices]
                elif names.get(n, n) != n:
                    reps[acc] = tensors[names[n]].base[acc.indices]
            return expr.xreplace(reps)

        for eq in part.equations:
            label = eq.label or part.name
            if isinstance(feed, Equation) and k > 0 and any(
                    str(a.base.label) == "x" for a in eq.rhs.atoms(sp.Indexed)):
                label = f"{label} ∘ {feed.label}"
            if eq.target == out.name and not last:
                rhs = rename(eq.rhs)
                if rhs.atoms(*REDUCTIONS):       # keep it in memory: a saved intermediate
                    mid = dataclasses.replace(out, name=f"{out.name}{k}", role=Role.SAVED)
                    tensors[mid.name] = mid
                    equations.append(Equation(mid.base[eq.lhs.indices], rhs, label))
                    feed = mid
                else:
                    feed = Equation(eq.lhs, rhs, label)
                continue
            equations.append(Equation(rename(eq.lhs), rename(eq.rhs), label))
        joined.append((part, dict(names)))
    return Layer(name, list(tensors.values()), equations, constants=constants,
                 doc=" → ".join(p.name for p in parts), parts=tuple(joined))


def _bound_indices(eq: Equation) -> set:
    out = set(eq.lhs.indices)
    for node in eq.rhs.atoms(*REDUCTIONS):
        out |= set(node.variables)
    return out
