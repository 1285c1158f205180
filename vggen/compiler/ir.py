"""Kernel IR: the records of what one generated kernel computes, between SymPy and the targets.

The passes that build them are ``vggen.compiler.passes`` (specialise, analyse,
lower, fuse, classify, order), run in order by ``vggen.compiler.pipeline``;
each target decides from them how to run a kernel (its schedule) and prints
it (``vggen.compiler.targets``).  Nothing here is specific to a target.

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

import enum
import functools
import re
from dataclasses import dataclass, field

import sympy as sp

from vggen.compiler.symbolic import range_guards, size_symbols
from vggen.frontend.lang import Equation, Tensor


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
    """One generated kernel: its stages over one parallel loop nest, and what
    it reads, writes and needs as arguments (the signature convention)."""

    name: str
    layer: str                     # the forward layer's name
    direction: str                 # "forward" or "backward"
    cls: KernelClass
    parallel: list[Loop]
    stages: list[Stage]
    tensors: dict                  # name -> specialised Tensor (every tensor of the layer)
    specialise: dict               # symbol -> value substituted
    # a contraction's loop run innermost, contiguous for most accesses
    # (``passes.order``): the last parallel loop or its reduction's last loop
    innermost: Loop | None = None

    # ---- derived views
    @property
    def reductions(self) -> list[Reduction]:
        return [r for s in self.stages for r in s.reductions]

    @functools.cached_property
    def passes(self) -> list[Pass]:
        """The stages in fused passes over the data (see ``reduction_passes``)."""
        return reduction_passes(self.stages)

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
        sizes = size_symbols(self.tensors)
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
        return range_guards(self.expressions())

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
        """Inclusive range of every loop variable (for the printers' proofs)."""
        return {lp.var: (lp.first, lp.last) for lp in self.loops()}


def layer_slug(name: str) -> str:
    """'Convolution2D' → 'convolution2d', 'MaxPooling2D(S=3)' → 'maxpooling2d_s_3'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
