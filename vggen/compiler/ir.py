"""Kernel IR: what one generated kernel computes, between SymPy and the templates.

Staged like pystencils 2.0 / Devito, each stage a function below:

1. **specialise**  window sizes (K, S) and constants (ε) become numbers; every
   other size (B, C, H, W, IC, OC, HO, WO) stays a run-time ``int`` argument.
2. **analyse**     reject, with a VggenError naming the access, what cannot be
   emitted safely: an element written by two iterations (left-hand indices
   that are not distinct plain indices, or a right-hand index bound neither
   on the left nor by a declared reduction), a read of the tensor being
   written, a rank mismatch, a data-dependent or non-affine index, an
   out-of-range read of a tensor that is not zero outside, an unsupported
   SymPy node.  Nothing is printed before this passes.
3. **lower**       one equation → one ``Stage``: the left-hand indices become
   the parallel loops; each reduction node becomes a ``Reduction`` whose
   run-time ranges are loops and whose constant window (after step 1) is
   unrolled into the body; reads of zero-outside tensors become explicit
   range guards (``Piecewise``), dropped where the loop ranges prove them.
4. **fuse**        consecutive stages of a layer that share the parallel loop
   nest go into one kernel; a later stage reads an earlier one's result from
   a register (``Stage.local``).  ArgMax + its selection equation fuse into a
   ``window_argmax`` kernel whose selection is the maximum itself.
5. **classify / schedule**  ``KernelClass`` picks the template; ``Schedule``
   records the loop decisions the templates follow (C's vector loop and its
   interior/boundary split, CUDA's thread- or block-per-element mapping), and
   for a contraction that is a matrix product its ``Gemm`` form (C runs it
   as packed blocks and a register-tiled micro-kernel).

Kernel signature convention (the runtimes rely on it)
-----------------------------------------------------
A kernel ``<layer>_<forward|backward>_<tensor>[_<tensor>…]`` (lower case;
several tensors when stages were fused) takes, in this order:

1. one pointer per tensor it **reads**, sorted by tensor name (Python ``str``
   order: ASCII, so upper case before lower case): ``const float *`` for
   float tensors, ``const int32_t *`` (CUDA: ``const int *``) for int tensors;
2. one pointer per tensor it **writes**, sorted by name: ``float *`` /
   ``int32_t *``; a tensor a kernel writes is never also one of its reads;
3. one ``int`` per run-time size symbol it needs, sorted by name (e.g.
   ``B, H, IC, OC, W``).

Tensors are dense, row-major (C order), contiguous, with exactly the shape the
manifest records (e.g. ``w``: ``OC, IC, 3, 3``); an element's first index per
dimension is the tensor's ``lower`` (w's window dims start at −K), which the
kernel subtracts itself.  Every element of every written tensor is written
(no pre-zeroing needed).  Total sizes must stay below 2³¹ elements.
``Kernel.args`` is this list; the manifest records it as ``signature``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import itertools
import re
from dataclasses import dataclass, field

import sympy as sp

from vggen.errors import VggenError
from vggen.frontend.lang import (
    REDUCTIONS,
    ArgMax,
    Equation,
    Layer,
    ReduceMax,
    Role,
    Tensor,
    affine_range,
    provably,
)

# A constant window of at most this many positions is unrolled into the body
# (VGG's 3×3 and 2×2, a 5×5 too); a larger one stays a loop.
UNROLL_LIMIT = 64

# Threads per CUDA block; block reductions assume a power of two.
CUDA_THREADS = 256
# Blocks resident at once on an H100/H200 (132 SMs × 2): the fixed grid of the
# kernels that share their work out themselves (tiled contractions, split reductions).
CUDA_RESIDENT_BLOCKS = 264

# generated locals (acc_y, v_y, best_sel, arg_sel) and helpers (vg_*) use these
_RESERVED = ("vg_", "acc_", "v_", "best_", "arg_")
_C_KEYWORDS = set("""auto break case char const continue default do double else enum extern float for
goto if inline int long register restrict return short signed sizeof static struct switch typedef
union unsigned void volatile while bool true false""".split())
# Node types the printers can emit (besides numbers, symbols and accesses).
_SUPPORTED = (sp.Add, sp.Mul, sp.Pow, sp.exp, sp.log, sp.tanh, sp.sin, sp.cos, sp.Abs, sp.Max, sp.Min,
              sp.Piecewise, sp.functions.elementary.piecewise.ExprCondPair, sp.KroneckerDelta, sp.floor, sp.Mod, sp.core.relational.Relational,
              sp.And, sp.Or, sp.Not, sp.Sum, ReduceMax, ArgMax)


class KernelClass(str, enum.Enum):
    """What a kernel's loop nest looks like; one template per class."""

    ELEMENTWISE = "elementwise"       # a map over the output elements
    REDUCTION = "reduction"           # Σ over some indices of an elementwise body (μ, σ², ∂L/∂γ, ∂L/∂β)
    CONTRACTION = "contraction"       # Σ of a product of two operands with affine index maps
    WINDOW_ARGMAX = "window_argmax"   # first-maximum position in a constant window (+ its selection)
    ROW_SOFTMAX = "row_softmax"       # per-row max and sums (softmax cross-entropy's m, s, L)


# --------------------------------------------------------------------------- IR records


@dataclass(frozen=True)
class Loop:
    """One loop: ``var`` runs over first..last inclusive."""

    var: sp.Symbol
    first: sp.Expr
    last: sp.Expr

    @property
    def end(self) -> sp.Expr:
        """One past the last value (the C loop's ``<`` bound)."""
        return sp.expand(self.last + 1)

    @property
    def extent(self) -> sp.Expr:
        return sp.expand(self.last - self.first + 1)

    @property
    def constant(self) -> bool:
        return self.extent.is_Integer


@dataclass
class Reduction:
    """``acc = op over loops of body``; op is "sum", "max" or "argmax".

    An argmax has no loops: its constant window is unrolled into
    ``positions`` [(row-major position, body there)], and besides ``acc``
    (the position) it keeps ``best`` (the maximum itself).
    """

    op: str
    acc: sp.Symbol
    loops: list[Loop]
    body: sp.Expr | None = None
    positions: list[tuple[int, sp.Expr]] = field(default_factory=list)
    best: sp.Symbol | None = None
    contraction: bool = False          # Σ of a product of two operands (see _is_contraction)
    # a contraction's Σ as written, before its constant window is unrolled (for its GEMM form):
    limits: list[Loop] = field(default_factory=list)   # every loop of the Σ, window included, in order
    term: sp.Expr | None = None                        # the summand, range guards explicit over ``limits``


@dataclass
class Stage:
    """One equation inside a kernel: ``tensor[parallel indices] = value``.

    ``value`` is the right-hand side with each reduction replaced by its
    accumulator and reads of earlier stages' results by their ``local``.
    """

    equation: Equation                 # the source equation, as written (unspecialised)
    tensor: Tensor                     # the written tensor (specialised)
    lhs: tuple                         # the kernel's parallel index symbols
    reductions: list[Reduction]
    value: sp.Expr
    local: sp.Symbol                   # register holding the value, for later stages

    @property
    def store(self) -> sp.Indexed:
        return self.tensor.base[self.lhs]

    @property
    def source(self) -> str:
        label = f"  ({self.equation.label})" if self.equation.label else ""
        return f"{self.equation}{label}"


@dataclass
class Nest:
    """Reductions that share one loop nest: computed in one pass over it."""

    loops: list[Loop]
    reductions: list[Reduction]


@dataclass
class Pass:
    """Consecutive stages whose reductions run fused (loop fusion), then their stores."""

    nests: list[Nest]
    stages: list[Stage]


def _loop_key(loops: list[Loop]) -> tuple:
    return tuple((lp.var, lp.first, lp.last) for lp in loops)


def reduction_passes(stages: list[Stage]) -> list[Pass]:
    """Group ``stages`` so that independent reductions over the same loops
    share one pass (BN's ∂L/∂γ and ∂L/∂β read g_y and x̂ once, not twice).
    A stage joins the pass before it when each of its reductions (sum or
    max) loops exactly as one already there and reads none of that pass's
    results (σ² reads μ: it starts a new pass)."""
    out: list[Pass] = []
    for s in stages:
        last = out[-1] if out else None
        joinable = (last is not None and s.reductions
                    and all(r.op in ("sum", "max") and r.loops for r in s.reductions)
                    and all(r.op in ("sum", "max") for n in last.nests for r in n.reductions)
                    and all(n.reductions for n in last.nests)
                    and not any(r.body.free_symbols & {t.local for t in last.stages}
                                for r in s.reductions)
                    and {_loop_key(r.loops) for r in s.reductions}
                    <= {_loop_key(n.loops) for n in last.nests})
        if not joinable:
            last = Pass([], [])
            out.append(last)
        for r in s.reductions:
            nest = next((n for n in last.nests if _loop_key(n.loops) == _loop_key(r.loops)
                         and r.op in ("sum", "max") and all(x.op in ("sum", "max") for x in n.reductions)),
                        None)
            if nest is None:
                last.nests.append(Nest(r.loops, [r]))
            else:
                nest.reductions.append(r)
        last.stages.append(s)
    return out


@dataclass
class Region:
    """Interior/boundary split of a loop nest's range guards.

    Where ``cond`` holds (it reads only loops enclosing ``var``) and
    ``first ≤ var ≤ last``, every guard in ``guards`` holds, so the body is
    ``interior`` (no per-element branch); elsewhere the guarded body is used.
    ``var`` is None for a per-thread test (CUDA), where ``cond`` says it all.
    """

    var: sp.Symbol | None
    cond: sp.Basic
    first: sp.Expr | None
    last: sp.Expr | None
    guards: list
    interior: sp.Expr


# Flat indices of a GEMM's three matrix dims, and the start of a run of its
# packing loops' innermost variable (C locals of the contraction template).
GEMM_FLAT = {d: sp.Symbol(f"vg_{d}", integer=True) for d in "mnk"}
GEMM_RUN = sp.Symbol("vg_run", integer=True)


# The C matrix-product schedule's block and tile sizes (templates/c/file.c.j2
# explains each; the manifest lists them per kernel).  Edit here; `vggen build`.
C_GEMM_BLOCKS = {"VG_MR": 8, "VG_NR": 32, "VG_KC": 256, "VG_NC": 512,
                 "VG_IM": 4, "VG_IN": 6, "VG_VL": 16, "VG_IKC": 1024, "VG_INC": 96, "VG_SLICES": 4,
                 "VG_SMALL": 1 << 16, "VG_RUN": 16, "VG_INNER": 2}


@dataclass
class Gemm:
    """A contraction as the matrix product ``C[m, n] = Σ_k A[m, k]·B[k, n]`` (C's schedule).

    ``m`` / ``n``: the output loops only the first / only the second operand
    reads, in the output's order (``n`` holds the output's last index);
    ``k``: every loop of the Σ, its constant window included, in the Σ's
    order (with ``inner``, the vector loop last).  Each list is flattened
    row-major into one matrix dim (``size``, ``flat``, ``unflat``).

    ``a`` / ``b``: the operands' elements, each its read with the range
    guards that read only its own loops (``a`` also carries any constant
    coefficient); ``a_region`` hoists A's guards out of the innermost loop
    its packing runs along (k's last).  Packing runs along n (``outer``: A broadcast
    against rows of B and C) or, where ``inner``, may run along k instead:
    both operands are then packed k-contiguous and the micro-kernel reduces
    along k (conv ∂L/∂w and Linear ∂L/∂x, which reduce along a contiguous
    index; their k holds that index last).
    """

    m: list[Loop]
    n: list[Loop]
    k: list[Loop]
    a: sp.Expr
    b: sp.Expr
    inner: bool
    a_region: Region | None = None

    def loops(self, dim: str) -> list[Loop]:
        return {"m": self.m, "n": self.n, "k": self.k}[dim]

    def size(self, dim: str) -> sp.Expr:
        """The matrix dim's extent: the product of its loops' extents."""
        return sp.Mul(*[lp.extent for lp in self.loops(dim)])

    def _strides(self, dim: str) -> list[sp.Expr]:
        loops = self.loops(dim)
        return [sp.Mul(*[lp.extent for lp in loops[q + 1:]]) for q in range(len(loops))]

    def flat(self, dim: str) -> sp.Expr:
        """The flat index from the loop variables (row-major)."""
        return sp.Add(*[(lp.var - lp.first) * st for lp, st in zip(self.loops(dim), self._strides(dim))])

    def unflat(self, dim: str) -> list[tuple[sp.Symbol, sp.Expr]]:
        """Each loop variable from the flat index ``GEMM_FLAT[dim]``."""
        f = GEMM_FLAT[dim]
        loops = self.loops(dim)
        out = []
        for q, (lp, st) in enumerate(zip(loops, self._strides(dim))):
            e = sp.floor(f / st) if st != 1 else f
            if q > 0:
                e = sp.Mod(e, lp.extent)
            out.append((lp.var, e + lp.first))
        return out

    def merge(self, dim: str, exprs, tensors: dict) -> int:
        """How many innermost loops of ``dim`` one run of its last variable may
        span, for code that evaluates ``exprs`` along it: the loops whose
        variables occur in ``exprs`` only inside accesses whose flat offset
        steps evenly across them (the outer loop's coefficient is the inner
        one's times the inner extent), so that running the last variable on
        past its extent reaches the same elements.  1: the last loop alone."""
        loops = self.loops(dim)
        exprs = [sp.sympify(e) for e in exprs]
        accesses = set().union(*[e.atoms(sp.Indexed) for e in exprs])
        outside = set().union(*[e.xreplace({a: sp.Dummy() for a in accesses}).free_symbols for e in exprs])
        offsets = [_flat_offset(a, tensors[str(a.base.label)]) for a in accesses]
        count = 1
        for q in range(len(loops) - 1, 0, -1):
            inner, outer = loops[q], loops[q - 1]
            if {inner.var, outer.var} & outside:
                break
            ok = True
            for off in offsets:
                poly = off.as_poly(inner.var, outer.var) if off.is_polynomial(inner.var, outer.var) else None
                if poly is None or poly.total_degree() > 1:
                    ok = False
                    break
                ci, co = off.coeff(inner.var), off.coeff(outer.var)
                if ci.has(inner.var, outer.var) or co.has(inner.var, outer.var) \
                        or sp.expand(co - ci * inner.extent) != 0:
                    ok = False
                    break
            if not ok:
                break
            count += 1
        return count

    def run_left(self, dim: str, count: int) -> sp.Expr:
        """How many values a run starting at the current loop variables (the
        last one as ``GEMM_RUN``) has left in its ``count`` merged loops."""
        loops = self.loops(dim)[-count:]
        left = sp.Mul(*[lp.extent for lp in loops])
        for q, lp in enumerate(loops):
            var = GEMM_RUN if q == len(loops) - 1 else lp.var
            left -= (var - lp.first) * sp.Mul(*[l2.extent for l2 in loops[q + 1:]])
        return sp.expand(left)

    def extent(self, dim: str, count: int) -> sp.Expr:
        """The extent of the last ``count`` loops of ``dim`` together."""
        return sp.Mul(*[lp.extent for lp in self.loops(dim)[-count:]])

    def table_aliases(self, dim: str) -> dict:
        """Each loop variable of ``dim`` printed as its column table's entry at
        ``vg_q`` (a block's columns, for runs too short to pack along)."""
        return {lp.var: f"vg_t_{lp.var}[vg_q]" for lp in self.loops(dim)}

    def segment(self, operand: str, dim: str, tensors: dict) -> tuple:
        """An operand along a run of ``dim`` merged for its read (``merge``):
        (its read at the run's start, the last variable at ``GEMM_RUN``; its
        element at ``vg_t`` along the run, the read as ``vg_src[vg_t·stride]``
        (``segment_aliases``) and the guards reading each column's indices
        from ``vg_s_<variable>``, the tables from the run on; those variables;
        the read's stride along the run).  Loads from ``vg_src`` at a
        constant stride (contiguous, in a conv) let the compiler vectorise
        the guards as masks."""
        e = getattr(self, operand)
        (read,) = e.atoms(sp.Indexed)
        run = self.loops(dim)[-1].var
        stride = _flat_offset(read, tensors[str(read.base.label)]).coeff(run)
        start = read.xreplace({run: GEMM_RUN})
        stand = {lp.var: sp.Symbol(f"vg_s_{lp.var.name}", integer=True) for lp in self.loops(dim)}
        if isinstance(e, sp.Piecewise):
            (val, cond), rest = e.args[0], e.args[1:]
            e = sp.Piecewise((val, cond.xreplace(stand)), *[(v, c) for v, c in rest])
        e = e.xreplace({read: _SRC})
        used = [lp.var for lp in self.loops(dim) if stand[lp.var] in e.free_symbols]
        return start, e, used, stride

    def segment_aliases(self, dim: str, stride: str) -> dict:
        """How ``segment``'s element prints its read (``stride`` printed) and
        table entries."""
        out = {_SRC: "vg_src[vg_t]" if stride == "1" else f"vg_src[(size_t)vg_t * ({stride})]"}
        out.update({sp.Symbol(f"vg_s_{lp.var.name}", integer=True): f"vg_s_{lp.var.name}[vg_t]"
                    for lp in self.loops(dim)})
        return out

    def read(self, operand: str) -> sp.Expr:
        """The operand without its guards (what a run of it loads)."""
        e = getattr(self, operand)
        return e.args[0][0] if isinstance(e, sp.Piecewise) else e

    def run(self, operand: str, inner: bool = False) -> Loop:
        """The innermost loop an operand's packing runs along: k's last, but
        n's last for B in the outer form."""
        return self.k[-1] if operand == "a" or inner else self.n[-1]

    def text(self, operand: str) -> str:
        """An operand's element in words, for the kernel's comments."""
        e = getattr(self, operand)
        if isinstance(e, sp.Piecewise):
            val, cond = e.args[0]
            conds = ", ".join(f"{sp.expand(_nonneg(c))} >= 0" if _nonneg(c) is not None else str(c)
                              for c in _conjuncts(cond))
            return f"{val} where {conds}, else 0"
        return str(e)

    def ranges(self) -> dict:
        """The flat indices' inclusive ranges (for the printers' proofs)."""
        return {GEMM_FLAT[d]: (sp.Integer(0), sp.expand(self.size(d) - 1)) for d in "mnk"}


@dataclass
class Schedule:
    """Loop decisions the templates follow.

    C: ``vector`` is the innermost, contiguous loop (``#pragma omp simd``);
    a contraction either accumulates a row of outputs along the last
    parallel dim (``row``) or reduces along its last reduction dim; its
    ``c_region`` hoists the range guards out of the vector loop's interior.
    Where the contraction is a matrix product (``gemm``), C runs it as one
    instead: packed operand blocks and a register-tiled micro-kernel
    (contraction.c.j2); the row/reduce loops are the fallback.
    CUDA: ``cuda`` is "thread" (one thread per output element, threadIdx.x
    along the last dim) or "block" (one block per output element, a
    shared-memory tree reduction over the reduction domain); ``cuda_region``
    is the per-thread interior test.
    """

    vector: sp.Symbol | None
    row: bool
    cuda: str
    c_region: Region | None = None
    cuda_region: Region | None = None
    gemm: Gemm | None = None


@dataclass(frozen=True)
class Arg:
    """One kernel argument, in signature order (see module docstring)."""

    name: str
    kind: str                      # "tensor" or "size"
    dtype: str                     # "float32", "int32" (tensors) or "int" (sizes)
    access: str                    # "read", "write" or "size"
    tensor: Tensor | None = None


@dataclass
class Kernel:
    name: str
    layer: str                     # the forward layer's name
    direction: str                 # "forward" or "backward"
    cls: KernelClass
    parallel: list[Loop]
    stages: list[Stage]
    schedule: Schedule
    tensors: dict                  # name -> specialised Tensor (every tensor of the layer)
    specialise: dict               # symbol -> value substituted

    # ---- derived views
    @property
    def reductions(self) -> list[Reduction]:
        return [r for s in self.stages for r in s.reductions]

    @functools.cached_property
    def passes(self) -> list[Pass]:
        """The stages in fused passes over the data (see ``reduction_passes``)."""
        return reduction_passes(self.stages)

    @property
    def cuda_split(self) -> bool:
        """CUDA: a block reduction in one pass over the data, so that several
        blocks may share one output's reduction domain, the last to finish
        combining their partials (``cuda/reduction.cu.j2``): BN's ∂L/∂γ, ∂L/∂β
        have a few dozen outputs of tens of thousands of terms each."""
        return (self.cls is KernelClass.REDUCTION and self.schedule.cuda == "block"
                and len(self.passes) == 1 and all(r.op in ("sum", "max") for r in self.reductions))

    @property
    def writes(self) -> list[Tensor]:
        return sorted((s.tensor for s in self.stages), key=lambda t: t.name)

    @property
    def reads(self) -> list[Tensor]:
        written = {s.tensor.name for s in self.stages}
        names = {str(a.base.label) for e in self.expressions() for a in e.atoms(sp.Indexed)}
        return [self.tensors[n] for n in sorted(names - written)]

    @property
    def sizes(self) -> list[sp.Symbol]:
        syms = set()
        for t in self.reads + self.writes:
            for e in t.shape + t.lower:
                syms |= e.free_symbols
        for lp in self.loops():
            syms |= lp.first.free_symbols | lp.last.free_symbols
        sizes = _size_set(self.tensors)
        for e in self.expressions():
            syms |= e.free_symbols & sizes
        return sorted(syms - {lp.var for lp in self.loops()}, key=lambda s: s.name)

    @property
    def args(self) -> list[Arg]:
        def tensor_arg(t, access):
            return Arg(t.name, "tensor", "int32" if t.dtype == "int" else "float32", access, t)
        return ([tensor_arg(t, "read") for t in self.reads] + [tensor_arg(t, "write") for t in self.writes]
                + [Arg(s.name, "size", "int", "size") for s in self.sizes])

    @property
    def equations(self) -> list[str]:
        return [s.source for s in self.stages]

    @property
    def guards(self) -> list:
        """Every range guard (integer relational) the kernel's arithmetic contains."""
        rels = set()
        for e in self.expressions():
            rels |= {r for r in e.atoms(sp.core.relational.Relational) if _nonneg(r) is not None}
        return sorted(rels, key=sp.default_sort_key)

    @property
    def operands(self) -> list[tuple[Tensor, list[tuple]]]:
        """Each tensor read, with every index map it is read by."""
        maps: dict = {}
        for e in self.expressions():
            for a in e.atoms(sp.Indexed):
                maps.setdefault(str(a.base.label), set()).add(tuple(a.indices))
        return [(t, sorted(maps[t.name], key=sp.default_sort_key)) for t in self.reads]

    def loops(self) -> list[Loop]:
        return self.parallel + [lp for r in self.reductions for lp in r.loops]

    def expressions(self) -> list[sp.Expr]:
        out = []
        for s in self.stages:
            out.append(s.value)
            for r in s.reductions:
                if r.body is not None:
                    out.append(r.body)
                out += [b for _, b in r.positions]
        return out

    def ranges(self) -> dict:
        """Inclusive range of every loop variable (for the printers' proofs),
        with a matrix product's window loops and flat indices."""
        out = {lp.var: (lp.first, lp.last) for lp in self.loops()}
        g = self.schedule.gemm
        if g is not None:
            out.update({lp.var: (lp.first, lp.last) for lp in g.k})
            out.update(g.ranges())
        return out


_SRC = sp.Symbol("vg_src", real=True)      # a packing run's read, at its position along the run


def _flat_offset(acc: sp.Indexed, t) -> sp.Expr:
    """The row-major element offset an access reads (as the printers flatten it)."""
    flat = sp.Integer(0)
    for k, (ix, lo, n) in enumerate(zip(acc.indices, t.lower, t.shape)):
        flat = (ix - lo) if k == 0 else flat * n + (ix - lo)
    return sp.expand(flat)


# --------------------------------------------------------------------------- 1. specialise


def specialisation(layer: Layer, specialise: dict | None) -> dict:
    """Symbol → number for the layer's symbols named in ``specialise``.

    Keys may be symbols or names ("K", "S", "epsilon"; "eps" is accepted);
    keys the layer does not use are ignored, so one dict serves every layer.
    Layer constants not named fall back to the layer's default value.
    """
    syms = set(layer.constants)
    for t in layer.tensors:
        for e in t.shape + t.lower:
            syms |= e.free_symbols
    for eq in layer.equations:
        for node in eq.rhs.atoms(*REDUCTIONS):
            for _, lo, hi in node.limits:
                syms |= lo.free_symbols | hi.free_symbols
    by_name = {s.name: s for s in syms}
    out = {}
    for key, value in (specialise or {}).items():
        name = key.name if isinstance(key, sp.Symbol) else str(key)
        name = "epsilon" if name == "eps" else name
        if name not in by_name:
            continue
        sym = by_name[name]
        if sym.is_integer:
            if int(value) != value or (sym.is_positive and value <= 0):
                raise VggenError(f"specialise {name}={value!r}: {name} is a positive integer size")
            out[sym] = sp.Integer(int(value))
        else:
            out[sym] = sp.Float(float(value))
    for c, v in layer.constants.items():
        out.setdefault(c, sp.Float(float(v)))
    return out


def _specialise_tensor(t: Tensor, subs: dict) -> Tensor:
    return dataclasses.replace(t, shape=tuple(sp.expand(s.xreplace(subs)) for s in t.shape),
                               lower=tuple(sp.expand(s.xreplace(subs)) for s in t.lower))


# --------------------------------------------------------------------------- 2. analyse


class _Analysis:
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
        elif t.dtype == "int" and not _int_valued(self.rhs, self.tensors):
            self.fail(f"{t.name} is an int tensor but the right-hand side is not integer-valued")
        self.visit(self.rhs, ranges, nested=False)

    def _tensor(self, acc) -> Tensor:
        name = str(acc.base.label)
        if name not in self.tensors:
            self.fail(f"access {acc}: tensor {name!r} is not declared in the layer")
        t = self.tensors[name]
        if len(acc.indices) != t.rank:
            self.fail(f"access {acc} has {len(acc.indices)} indices; {name} has rank {t.rank}")
        return t

    def visit(self, e, ranges, nested):
        if isinstance(e, sp.Indexed):
            return self.access(e, ranges)
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
                inner[v] = (lo, hi)
            if nested and not _constant_window(e):
                self.fail(f"nested reduction {e} over a run-time range")
            if isinstance(e, ArgMax) and not _constant_window(e):
                self.fail(f"ArgMax {e} needs a constant window of at most {UNROLL_LIMIT} positions "
                          f"(specialise its size)")
            return self.visit(e.function, inner, nested=True)
        if not isinstance(e, _SUPPORTED):
            self.fail(f"{type(e).__name__} ({e}) has no C/CUDA form")
        if isinstance(e, sp.Piecewise) and e.args[-1].cond is not sp.true:
            self.fail(f"{e} has no otherwise branch (add (0, True))")
        for a in e.args:
            self.visit(a, ranges, nested)

    def access(self, acc, ranges):
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
                self.visit(sorted(unbound, key=lambda s: s.name)[0], ranges, False)
            if not _affine_index(e, set(ranges)):
                self.fail(f"access {acc}: index {e} is not affine in the loop indices")
            if t.zero_outside:
                continue
            rng = affine_range(e, ranges)
            if not (rng and provably(rng[0] >= first) and provably(rng[1] <= last)):
                self.fail(f"access {acc} can leave {t.name}'s range {first}..{last} in dimension {pos} "
                          f"and {t.name} is not zero outside")


def _constant_window(node) -> bool:
    ext = 1
    for _, lo, hi in node.limits:
        if not (lo.is_Integer and hi.is_Integer):
            return False
        ext *= int(hi - lo + 1)
    return ext <= UNROLL_LIMIT


def _affine_index(e, loop_vars: set) -> bool:
    """Affine in the loop indices, or floor/Mod of such by a positive constant or size."""
    if isinstance(e, (sp.floor, sp.Mod)):
        arg = e.args[0]
        if isinstance(e, sp.floor):
            arg, den = sp.fraction(sp.together(arg))
        else:
            den = e.args[1]
        return bool(den.is_positive and den.is_integer) and _affine_index(arg, loop_vars)
    if e.atoms(sp.floor, sp.Mod):
        return all(_affine_index(t, loop_vars) for t in sp.Add.make_args(e))
    e = sp.expand(e)
    if not e.is_polynomial(*loop_vars):
        return False
    poly = sp.Poly(e, *loop_vars) if loop_vars else None
    return poly is None or poly.total_degree() <= 1


def _int_valued(e, tensors: dict) -> bool:
    """Whether ``e`` evaluates to an integer in C (ints, index arithmetic, int tensors)."""
    if isinstance(e, sp.Indexed):
        return tensors[str(e.base.label)].dtype == "int"
    if isinstance(e, sp.Symbol):
        return bool(e.is_integer)
    if e.is_Number:
        return bool(e.is_Integer)
    if isinstance(e, (sp.KroneckerDelta, sp.core.relational.Relational, sp.And, sp.Or, sp.Not)) \
            or e in (sp.true, sp.false):
        return True
    if isinstance(e, (sp.floor, sp.Mod)):
        return all(_int_valued(a, tensors) for a in e.args) or isinstance(e, sp.floor)
    if isinstance(e, sp.Piecewise):
        return all(_int_valued(v, tensors) for v, _ in e.args)
    if isinstance(e, sp.Pow):
        return _int_valued(e.base, tensors) and e.exp.is_Integer and e.exp >= 0
    if isinstance(e, (sp.Add, sp.Mul, sp.Max, sp.Min, sp.Abs)):
        return all(_int_valued(a, tensors) for a in e.args)
    if isinstance(e, ArgMax):
        return True
    return False


def _is_index_relational(r) -> bool:
    return not r.atoms(sp.Indexed) and all(s.is_integer for s in r.free_symbols)


# --------------------------------------------------------------------------- 3. lower


def _nonneg(rel):
    """d with ``rel ⟺ d ≥ 0`` for an integer inequality (SymPy rewrites
    ``Ge(d, 0)`` as it likes, e.g. ``H - i >= 2`` or ``-H + i <= -1``, so
    relationals are compared by this, never by form); None otherwise."""
    if not isinstance(rel, sp.core.relational.Relational) or not _is_index_relational(rel):
        return None
    d = sp.expand(rel.lhs - rel.rhs)
    if isinstance(rel, sp.GreaterThan):
        return d
    if isinstance(rel, sp.StrictGreaterThan):
        return d - 1
    if isinstance(rel, sp.LessThan):
        return -d
    if isinstance(rel, sp.StrictLessThan):
        return -d - 1
    return None


def _proved(d, ranges) -> bool:
    """``d >= 0`` holds for every value of the loops in ``ranges``."""
    if d is None:
        return False
    rng = _range(d, ranges)
    return bool(rng) and provably(rng[0] >= 0)


def _range(e, ranges):
    """Inclusive [lo, hi] of an affine expression whose terms may be floor/Mod of
    affine ones (each such term becomes a fresh index with its own range)."""
    ranges = dict(ranges)
    subs = {}
    for k, node in enumerate(sorted(e.atoms(sp.floor, sp.Mod), key=sp.default_sort_key)):
        if isinstance(node, sp.floor):
            rng = affine_range(node, ranges)
        elif node.args[1].is_positive and node.args[1].is_integer:
            rng = (sp.Integer(0), node.args[1] - 1)
        else:
            rng = None
        if rng is None:
            return None
        subs[node] = sp.Dummy(f"t{k}", integer=True)
        ranges[subs[node]] = rng
    return affine_range(e.xreplace(subs), ranges)


def _conjuncts(cond) -> list:
    return list(cond.args) if isinstance(cond, sp.And) else [cond]


def _explicit_guards(e, ranges, tensors, known=frozenset()):
    """Zero-outside reads → Piecewise((read, in range), (0, True)); index
    conditions dropped where ``ranges`` prove them or an enclosing Piecewise
    branch already tests them (``known``: the d of its conditions d ≥ 0)."""
    if isinstance(e, sp.Indexed):
        t = tensors[str(e.base.label)]
        if not t.zero_outside:
            return e
        conds = []
        for ix, (first, last) in zip(e.indices, t.index_ranges()):
            for d in (sp.expand(ix - first), sp.expand(last - ix)):
                if d not in known and not _proved(d, ranges):
                    conds.append(sp.Ge(d, 0))
        return sp.Piecewise((e, sp.And(*conds)), (0, True)) if conds else e
    if isinstance(e, sp.Piecewise):
        pairs = []
        for val, cond in e.args:
            cond = _explicit_guards(cond, ranges, tensors, known)
            if cond is sp.false:
                continue
            inner = known | {d for d in map(_nonneg, _conjuncts(cond)) if d is not None}
            pairs.append((_explicit_guards(val, ranges, tensors, inner), cond))
            if cond is sp.true:
                break
        return sp.Piecewise(*pairs)
    if isinstance(e, sp.core.relational.Relational):
        rel = e.func(*[_explicit_guards(a, ranges, tensors, known) for a in e.args])
        d = _nonneg(rel)
        return sp.true if d is not None and (d in known or _proved(d, ranges)) else rel
    if not e.args or isinstance(e, sp.Symbol) or e.is_Number:
        return e
    return e.func(*[_explicit_guards(a, ranges, tensors, known) for a in e.args])


def _unroll(node, body=None) -> list[tuple[int, sp.Expr]]:
    """[(row-major position, body)] over every point of a constant window."""
    body = node.function if body is None else body
    lims = [(v, int(lo), int(hi)) for v, lo, hi in node.limits]
    out = []
    for pos, point in enumerate(itertools.product(*[range(lo, hi + 1) for _, lo, hi in lims])):
        out.append((pos, _inline_windows(body.xreplace({v: sp.Integer(x) for (v, _, _), x in zip(lims, point)}))))
    return out


def _inline_windows(e):
    """Replace Sum/ReduceMax over constant windows by their unrolled expansion
    (bottom-up, so a window inside a window unrolls too)."""
    def expand(n):
        terms = [b for _, b in _unroll(n)]
        return sp.Add(*terms) if isinstance(n, sp.Sum) else sp.Max(*terms)
    return e.replace(lambda n: isinstance(n, (sp.Sum, ReduceMax)) and _constant_window(n), expand)


def _is_contraction(node, parallel: tuple, tensors: dict) -> bool:
    """Σ of (guarded) coefficient · A[f(…)] · B[g(…)], each operand missing some output index.

    The missing indices are what makes it a contraction (each operand element
    is reused across them, as in a matrix product); Σ A·B with both indexed by
    every output index (∂L/∂γ) is an ordinary reduction.
    """
    if not isinstance(node, sp.Sum):
        return False
    body = node.function
    while isinstance(body, sp.Piecewise) and len(body.args) == 2 and body.args[1].expr == 0:
        body = body.args[0].expr
    factors = sp.Mul.make_args(body)
    operands = [f for f in factors if isinstance(f, sp.Indexed)]
    rest = [f for f in factors if not isinstance(f, sp.Indexed)]
    if len(operands) != 2 or any(r.free_symbols - _size_set(tensors) for r in rest):
        return False
    loop_vars = set(parallel) | set(node.variables)
    for op in operands:
        if tensors[str(op.base.label)].dtype != "float":
            return False
        if not all(_affine_index(sp.sympify(ix), loop_vars) and not ix.atoms(sp.floor, sp.Mod)
                   for ix in op.indices):
            return False
        used = set().union(*[sp.sympify(ix).free_symbols for ix in op.indices])
        if set(parallel) <= used:
            return False
    return True


def _size_set(tensors: dict) -> set:
    out = set()
    for t in tensors.values():
        for e in t.shape + t.lower:
            out |= e.free_symbols
    return out


def _rename_shadowing(rhs, outer: set):
    """A reduction index that reuses an output index's name (legal SymPy, e.g.
    ``g_x[w] = … / Sum(…, (w, 0, W - 1))``) gets a fresh name: in C they would
    be one variable."""
    taken = {s.name for s in rhs.free_symbols | outer}
    taken |= {v.name for n in rhs.atoms(*REDUCTIONS) for v in n.variables}

    def rename(node):
        subs = {}
        for v in node.variables:
            if v in outer:
                name = v.name
                while name in taken:
                    name += "2"
                taken.add(name)
                subs[v] = sp.Symbol(name, integer=True)
        return node.xreplace(subs)   # renames the limits and the body together

    return rhs.replace(lambda n: isinstance(n, REDUCTIONS) and set(n.variables) & outer, rename)


def _lower_stage(eq: Equation, layer: Layer, subs: dict, tensors: dict) -> Stage:
    where = f"{eq.label + ' of ' if eq.label else ''}{eq.target} in {layer.name} ({eq})"
    rhs = _rename_shadowing(eq.rhs.xreplace(subs), set(eq.lhs.indices) if isinstance(eq.lhs, sp.Indexed) else set())
    _Analysis(eq, rhs, tensors, where).run()
    t = tensors[eq.target]
    lhs = tuple(eq.lhs.indices)
    par_ranges = dict(zip(lhs, t.index_ranges()))

    # top-level reduction nodes (nested ones were checked constant; they unroll inside)
    nodes = rhs.atoms(*REDUCTIONS)
    top = sorted((n for n in nodes if not any(m != n and m.has(n) for m in nodes)), key=sp.default_sort_key)
    reductions, replace = [], {}
    for k, node in enumerate(top):
        suffix = f"_{k}" if len(top) > 1 else ""
        if isinstance(node, ArgMax):
            acc = sp.Symbol(f"arg_{t.name}{suffix}", integer=True)
            best = sp.Symbol(f"best_{t.name}{suffix}", real=True)
            positions = [(pos, _explicit_guards(b, par_ranges, tensors)) for pos, b in _unroll(node)]
            reductions.append(Reduction("argmax", acc, [], positions=positions, best=best))
            replace[node] = acc
            continue
        if _constant_window(node):
            replace[node] = _inline_windows(node)
            continue
        op = "sum" if isinstance(node, sp.Sum) else "max"
        lims = list(node.limits)
        const = [lim for lim in lims if lim[1].is_Integer and lim[2].is_Integer]
        ext = 1
        for _, lo, hi in const:
            ext *= int(hi - lo + 1)
        unrolled = const if ext <= UNROLL_LIMIT else []
        loops = [Loop(v, lo, hi) for v, lo, hi in lims if (v, lo, hi) not in unrolled]
        body = node.function
        if unrolled:
            window = sp.Sum(body, *unrolled) if op == "sum" else ReduceMax(body, *unrolled)
            body = _inline_windows(window)
        else:
            body = _inline_windows(body)
        ranges = dict(par_ranges)
        ranges.update({lp.var: (lp.first, lp.last) for lp in loops})
        acc = sp.Symbol(f"acc_{t.name}{suffix}", real=True)
        red = Reduction(op, acc, loops, _explicit_guards(body, ranges, tensors),
                        contraction=_is_contraction(node, lhs, tensors))
        if red.contraction:
            red.limits = [Loop(v, lo, hi) for v, lo, hi in lims]
            ranges.update({lp.var: (lp.first, lp.last) for lp in red.limits})
            red.term = _explicit_guards(_inline_windows(node.function), ranges, tensors)
        reductions.append(red)
        replace[node] = acc
    value = _explicit_guards(_inline_windows(rhs.xreplace(replace)), par_ranges, tensors)
    local = sp.Symbol(f"v_{t.name}", integer=True) if t.dtype == "int" else sp.Symbol(f"v_{t.name}", real=True)
    return Stage(eq, t, lhs, reductions, value, local)


# --------------------------------------------------------------------------- 4. fuse


def _loops_of(stage: Stage) -> list[Loop]:
    return [Loop(v, first, last) for v, (first, last) in zip(stage.lhs, stage.tensor.index_ranges())]


def _stage_kind(stage: Stage) -> str:
    ops = {r.op for r in stage.reductions}
    if "argmax" in ops:
        return "argmax"
    if len(stage.reductions) == 1 and stage.reductions[0].contraction:
        return "contract"
    return "reduce" if ops else "map"


def _cuda_mode(parallel: list[Loop], reductions: list[Reduction]) -> str:
    """Block per output element when the run-time reduction dims are at least as
    many as the run-time output dims (work per element beats parallelism across
    elements: BN statistics, ∂L/∂γ, conv ∂L/∂w over b,i,j, softmax rows); else
    one thread per element."""
    n_par = sum(not lp.constant for lp in parallel)
    n_red = max([sum(not lp.constant for lp in r.loops) for r in reductions if r.loops] or [0])
    return "block" if n_red and n_red >= n_par else "thread"


def _try_fuse(group: list[Stage], nxt: Stage) -> Stage | None:
    """``nxt`` rewritten into ``group``'s loop nest, or None where it may not join."""
    head = group[0]
    kinds = [_stage_kind(s) for s in group]
    kind = _stage_kind(nxt)
    # maps join anything but a contraction; reductions join a group that began with one
    if "contract" in kinds or kind in ("contract", "argmax"):
        return None
    if kind == "reduce" and kinds[0] != "reduce":
        return None
    ours = _loops_of(head)
    theirs = _loops_of(nxt)
    if len(ours) != len(theirs) or any(sp.expand(a.first - b.first) != 0 or sp.expand(a.last - b.last) != 0
                                       for a, b in zip(ours, theirs)):
        return None
    if kind == "reduce" and _cuda_mode(ours, [r for s in group for r in s.reductions]) \
            != _cuda_mode(ours, nxt.reductions):
        return None
    rename = dict(zip(nxt.lhs, head.lhs))
    bound = {lp.var for r in nxt.reductions for lp in r.loops}
    if bound & set(head.lhs):
        return None
    written = {s.tensor.name: s for s in group}
    if nxt.tensor.name in written:
        return None
    local = {}
    for s in group:
        local[s.store] = s.local

    def move(e):
        e = e.xreplace(rename).xreplace(local)
        for a in e.atoms(sp.Indexed):
            if str(a.base.label) in written:
                raise _NoFusion
        return e

    try:
        reds = [dataclasses.replace(r, body=move(r.body) if r.body is not None else None,
                                    positions=[(p, move(b)) for p, b in r.positions])
                for r in nxt.reductions]
        value = move(nxt.value)
    except _NoFusion:
        return None
    # the group must not read what nxt writes (it would read it before it is written),
    # unless nxt updates state in place and the group reads only the element that
    # the same iteration writes, before writing it
    for s in group:
        for e in [s.value] + [r.body for r in s.reductions if r.body is not None]:
            if any(str(a.base.label) == nxt.tensor.name
                   and not (nxt.tensor.role is Role.STATE and tuple(a.indices) == tuple(head.lhs))
                   for a in e.atoms(sp.Indexed)):
                return None
    for s in group:
        for r in s.reductions:
            if r.op == "argmax":
                value = _select_by_argmax(value, r, s.local)
    return Stage(nxt.equation, nxt.tensor, head.lhs, reds, value, nxt.local)


class _NoFusion(Exception):
    pass


def _select_by_argmax(value, r: Reduction, position: sp.Symbol):
    """Σ_k δ(k, position)·body_k over the argmax's own window is its maximum."""
    got = {}
    for term in sp.Add.make_args(value):
        deltas = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.KroneckerDelta) and f.has(position)]
        if len(deltas) != 1 or position not in deltas[0].args:
            return value
        other = [a for a in deltas[0].args if a != position]
        if len(other) != 1 or not other[0].is_Integer:
            return value
        got[int(other[0])] = term / deltas[0]
    if got == dict(r.positions):
        return r.best
    return value


# --------------------------------------------------------------------------- 5. classify, schedule


def _classify(stages: list[Stage]) -> KernelClass:
    kinds = {_stage_kind(s) for s in stages}
    if "argmax" in kinds:
        return KernelClass.WINDOW_ARGMAX
    if "contract" in kinds:
        return KernelClass.CONTRACTION
    if "reduce" in kinds:
        if any(r.op == "max" for s in stages for r in s.reductions):
            return KernelClass.ROW_SOFTMAX
        return KernelClass.REDUCTION
    return KernelClass.ELEMENTWISE


def _unit_coeff_last(acc: sp.Indexed, var) -> bool:
    last = sp.expand(acc.indices[-1])
    return not last.atoms(sp.floor, sp.Mod) and last.is_polynomial(var) and sp.diff(last, var) in (1, -1)


def _split_region(body, hoist: set, var, loop: Loop | None, sizes: set) -> Region | None:
    """Hoist the range guards of ``body`` that read only ``hoist`` loops (and,
    with unit coefficient, ``var``) out of the loop over ``var``."""
    rels = sorted((r for r in body.atoms(sp.core.relational.Relational) if _nonneg(r) is not None),
                  key=sp.default_sort_key)
    outer, lowers, uppers, hoisted = [], [], [], []
    for rel in rels:
        d = _nonneg(rel)
        free = d.free_symbols - sizes
        if var is None or var not in free:
            if free <= hoist:
                outer.append(rel)
                hoisted.append(rel)
            continue
        coeff = d.coeff(var)
        rest = sp.expand(d - coeff * var)
        if coeff in (1, -1) and not rest.has(var) and (rest.free_symbols - sizes) <= hoist:
            (lowers if coeff == 1 else uppers).append(-rest if coeff == 1 else rest)
            hoisted.append(rel)
    if not hoisted:
        return None
    interior = body.xreplace({rel: sp.true for rel in hoisted})
    first = last = None
    if var is not None:
        first = sp.Max(loop.first, *lowers)
        last = sp.Min(loop.last, *uppers)
    return Region(var, sp.And(*outer), first, last, hoisted, interior)


def _guarded_factors(e, conds: list, factors: list) -> bool:
    """Split a summand into range-guard conjuncts and product factors
    (``Piecewise((X, c), (0, True))·Y`` is X·Y under c); False where it is not
    such a guarded product."""
    if isinstance(e, sp.Piecewise):
        if len(e.args) != 2 or e.args[1].cond is not sp.true or e.args[1].expr != 0:
            return False
        conds += _conjuncts(e.args[0].cond)
        return _guarded_factors(e.args[0].expr, conds, factors)
    if isinstance(e, sp.Mul):
        return all(_guarded_factors(f, conds, factors) for f in e.args)
    factors.append(e)
    return True


@dataclass
class ProductSplit:
    """A contraction Σ_k c·A[m, k]·B[k, n] under range guards, split into its
    matrix-product view (shared by the C GEMM and the CUDA tiled schedules)."""

    m: list            # output loops only A reads
    n: list            # output loops only B reads; B holds the output's last index
    k: list            # the summed loops
    a_read: sp.Indexed
    b_read: sp.Indexed
    coeff: sp.Expr     # constant factor, folded into A
    a: sp.Expr         # c·A with A's guards
    b: sp.Expr         # B with B's guards
    a_guarded: bool
    b_guarded: bool


def split_product(parallel: list, term: sp.Expr, limits: list) -> ProductSplit | None:
    """The summand ``term`` over ``limits`` as a matrix product, or None where it
    is not one: not a guarded product of two tensor reads and a constant, an
    output index both operands read (a batch index) or neither, a guard that
    reads tensor data or both operands' loops."""
    conds, factors = [], []
    if not limits or not _guarded_factors(term, conds, factors) or any(c.atoms(sp.Indexed) for c in conds):
        return None
    loops = {lp.var for lp in parallel} | {lp.var for lp in limits}
    reads = [f for f in factors if isinstance(f, sp.Indexed)]
    coeff = [f for f in factors if not isinstance(f, sp.Indexed)]
    if len(reads) != 2 or any(f.free_symbols & loops or f.atoms(sp.Indexed) for f in coeff):
        return None
    used = [set().union(*[sp.sympify(ix).free_symbols for ix in a.indices]) & loops for a in reads]
    out = [lp.var for lp in parallel]
    if not out or used[0] & used[1] & set(out) or not set(out) <= used[0] | used[1]:
        return None
    second = 0 if out[-1] in used[0] else 1            # B holds the output's last (contiguous) index
    a_read, b_read = reads[1 - second], reads[second]
    m = [lp for lp in parallel if lp.var in used[1 - second]]
    n = [lp for lp in parallel if lp.var in used[second]]
    k = list(limits)
    if not m or not n:
        return None
    mk, nk = {lp.var for lp in m + k}, {lp.var for lp in n + k}
    a_conds, b_conds = [], []
    for c in conds:
        free = c.free_symbols & loops
        if free <= mk:
            a_conds.append(c)
        elif free <= nk:
            b_conds.append(c)
        else:
            return None
    c = sp.Mul(*coeff)
    a = c * a_read
    a = sp.Piecewise((a, sp.And(*a_conds)), (0, True)) if a_conds else a
    b = sp.Piecewise((b_read, sp.And(*b_conds)), (0, True)) if b_conds else b_read
    return ProductSplit(m, n, k, a_read, b_read, c, a, b, bool(a_conds), bool(b_conds))


def _gemm(parallel: list[Loop], stage: Stage, r: Reduction, inner: bool, vec: sp.Symbol, sizes: set) -> Gemm | None:
    """The C schedule's matrix product (see ``split_product``); with ``inner``
    the vector loop ``vec`` is the innermost k loop."""
    if not r.contraction or r.term is None:
        return None
    p = split_product(parallel, r.term, r.limits)
    if p is None:
        return None
    m, n, k = p.m, p.n, p.k
    if inner:
        k = [lp for lp in k if lp.var != vec] + [lp for lp in k if lp.var == vec]
    mk = {lp.var for lp in m + k}
    g = Gemm(m, n, k, p.a, p.b, inner)
    g.a_region = _split_region(p.a, mk - {k[-1].var}, k[-1].var, k[-1], sizes)
    return g


def _schedule(cls: KernelClass, parallel: list[Loop], stages: list[Stage], sizes: set) -> Schedule:
    reductions = [r for s in stages for r in s.reductions]
    cuda = _cuda_mode(parallel, reductions) if cls in (KernelClass.REDUCTION, KernelClass.ROW_SOFTMAX,
                                                       KernelClass.CONTRACTION) else "thread"
    if cls is not KernelClass.CONTRACTION:
        return Schedule(parallel[-1].var if parallel else None, False, cuda)
    (r,) = reductions
    # vector loop: the dim along which most accesses (the output's included) are contiguous
    accesses = sorted(r.body.atoms(sp.Indexed), key=sp.default_sort_key)
    out = stages[0].store
    cands = []
    if len(parallel) >= 2 and not parallel[-1].constant:
        v = parallel[-1].var
        cands.append((sum(_unit_coeff_last(a, v) for a in accesses + [out]), 1, "row", parallel[-1]))
    for lp in r.loops:
        if not lp.constant:
            cands.append((sum(_unit_coeff_last(a, lp.var) for a in accesses), 0, "reduce", lp))
    if not cands:                                          # every loop constant: reduce along the last
        cands.append((0, 0, "reduce", r.loops[-1]))
    _, _, mode, vec = max(cands, key=lambda c: (c[0], c[1]))
    if mode == "reduce":                                   # the vector loop innermost
        r.loops = [lp for lp in r.loops if lp is not vec] + [vec]
    enclosing = ({lp.var for lp in parallel} - {vec.var}) | {lp.var for lp in r.loops if lp is not vec}
    c_region = _split_region(r.body, enclosing, vec.var, vec, sizes)
    cuda_region = None
    if cuda == "thread":
        cuda_region = _split_region(r.body, {lp.var for lp in parallel}, None, None, sizes)
    gemm = _gemm(parallel, stages[0], r, mode == "reduce", vec.var, sizes)
    return Schedule(vec.var, mode == "row", cuda, c_region, cuda_region, gemm)


# --------------------------------------------------------------------------- entry points


def layer_slug(name: str) -> str:
    """'Convolution2D' → 'convolution2d', 'MaxPooling2D(S=3)' → 'maxpooling2d_s_3'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _kernel(stages: list[Stage], layer: Layer, subs: dict, tensors: dict, name: str | None) -> Kernel:
    base, direction = layer.forward_name, layer.direction
    cls = _classify(stages)
    parallel = _loops_of(stages[0])
    if name is None:
        name = "_".join([layer_slug(base), direction] + [s.tensor.name.lower() for s in stages])
    sizes = _size_set(tensors)
    return Kernel(name, base, direction, cls, parallel, stages, _schedule(cls, parallel, stages, sizes),
                  tensors, dict(subs))


def lower(equation: Equation, layer: Layer, specialise: dict | None = None, *, name: str | None = None) -> Kernel:
    """One equation of ``layer`` as a single-stage kernel (analysed, lowered, scheduled)."""
    subs = specialisation(layer, specialise)
    tensors = {t.name: _specialise_tensor(t, subs) for t in layer.tensors}
    return _kernel([_lower_stage(equation, layer, subs, tensors)], layer, subs, tensors, name)


def lower_layer(layer: Layer, specialise: dict | None = None, *, fuse: bool = True) -> list[Kernel]:
    """Every equation of ``layer`` (a forward layer or a ``Backward.program``),
    consecutive ones fused where they share the loop nest."""
    subs = specialisation(layer, specialise)
    tensors = {t.name: _specialise_tensor(t, subs) for t in layer.tensors}
    groups: list[list[Stage]] = []
    for eq in layer.equations:
        stage = _lower_stage(eq, layer, subs, tensors)
        joined = _try_fuse(groups[-1], stage) if (fuse and groups) else None
        if joined is not None:
            groups[-1].append(joined)
        else:
            groups.append([stage])
    kernels = [_kernel(g, layer, subs, tensors, None) for g in groups]
    names = [k.name for k in kernels]
    if len(set(names)) != len(names):
        raise VggenError(f"layer {layer.name}: two kernels would be named alike: {names}")
    return kernels


def lower_network(layers: list[Layer], specialise: dict | None = None) -> list[Kernel]:
    """Forward then backward kernels of each layer, in order."""
    from vggen.derive.autodiff import derive

    out = []
    for layer in layers:
        out += lower_layer(layer, specialise)
        if layer.differentiable_inputs:          # an optimizer's update has no backward
            out += lower_layer(derive(layer).program, specialise)
    names = [k.name for k in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise VggenError(f"two layers give kernels of the same name: {', '.join(dup)}")
    return out
