"""C schedule of a kernel: its vector loop, the interior/boundary split, and a matrix product's form.

``vector`` is the innermost, contiguous loop (``#pragma omp simd``); a
contraction either accumulates a row of outputs along the last parallel dim
(``row``) or reduces along its last reduction dim; its ``region`` hoists the
range guards out of the vector loop's interior.  Where the contraction is a
matrix product (``gemm``), C runs it as one instead: packed operand blocks
and a register-tiled micro-kernel (``c/contraction.c.j2``); the row/reduce
loops are the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from vggen.compiler.analysis import split_product, split_region
from vggen.compiler.ir import Kernel, KernelClass, Loop, Reduction, Region
from vggen.compiler.symbolic import flat_offset, guard_text, size_symbols

# Flat indices of a GEMM's three matrix dims, and the start of a run of its
# packing loops' innermost variable (C locals of the contraction template).
GEMM_FLAT = {d: sp.Symbol(f"vg_{d}", integer=True) for d in "mnk"}
GEMM_RUN = sp.Symbol("vg_run", integer=True)
_SRC = sp.Symbol("vg_src", real=True)      # a packing run's read, at its position along the run


# The C matrix-product schedule's block and tile sizes (templates/c/file.c.j2
# explains each; the manifest lists them per kernel).  Edit here; `vggen build`.
C_GEMM_BLOCKS = {"VG_MR": 8, "VG_NR": 32, "VG_KC": 256, "VG_NC": 512,
                 "VG_IM": 4, "VG_IN": 6, "VG_VL": 16, "VG_IKC": 1024, "VG_INC": 96, "VG_SLICES": 4,
                 "VG_SMALL": 1 << 16, "VG_RUN": 16, "VG_INNER": 2, "VG_WT": 256}


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
    # the packing runs the template places, by "<what>:<dim>": how many
    # innermost loops of dim one run spans (``merge``; "out": the stores),
    # and an operand's element along its run (``segment``)
    spans: dict = field(default_factory=dict)
    segments: dict = field(default_factory=dict)

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
        offsets = [flat_offset(a, tensors[str(a.base.label)]) for a in accesses]
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
        stride = flat_offset(read, tensors[str(read.base.label)]).coeff(run)
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
        return guard_text(getattr(self, operand))

    def ranges(self) -> dict:
        """The flat indices' inclusive ranges (for the printers' proofs)."""
        return {GEMM_FLAT[d]: (sp.Integer(0), sp.expand(self.size(d) - 1)) for d in "mnk"}


@dataclass
class Schedule:
    """Loop decisions the C templates follow (see the module docstring)."""

    vector: sp.Symbol | None
    row: bool = False
    region: Region | None = None
    gemm: Gemm | None = None


def _gemm(kernel: Kernel, r: Reduction, inner: bool, vec: sp.Symbol, sizes: set) -> Gemm | None:
    """The matrix product (see ``split_product``); with ``inner`` the vector
    loop ``vec`` is the innermost k loop."""
    parallel, tensors, stage = kernel.parallel, kernel.tensors, kernel.stages[0]
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
    g.a_region = split_region(p.a, mk - {k[-1].var}, k[-1].var, k[-1], sizes)
    g.spans = {"a:k": g.merge("k", [g.a], tensors), "out:n": g.merge("n", [stage.store, stage.value], tensors)}
    for d in ("n", "k") if inner else ("n",):        # B is packed along n, and along k in the inner form
        g.spans[f"b:{d}"] = g.merge(d, [g.read("b")], tensors)
        g.segments[f"b:{d}"] = g.segment("b", d, tensors)
    return g


def schedule(kernel: Kernel) -> Schedule:
    """The kernel's C schedule: its last output loop vectorised, or for a
    contraction its innermost loop (``Kernel.innermost``), with that loop's
    guards hoisted and, where it is a matrix product, its GEMM form."""
    parallel = kernel.parallel
    if kernel.cls is not KernelClass.CONTRACTION:
        return Schedule(parallel[-1].var if parallel else None)
    (r,) = kernel.reductions
    vec = kernel.innermost
    reduce = any(lp is vec for lp in r.loops)
    sizes = size_symbols(kernel.tensors)
    enclosing = ({lp.var for lp in parallel} - {vec.var}) | {lp.var for lp in r.loops if lp is not vec}
    region = split_region(r.body, enclosing, vec.var, vec, sizes)
    return Schedule(vec.var, not reduce, region, _gemm(kernel, r, reduce, vec.var, sizes))


def ranges(kernel: Kernel, sched: Schedule) -> dict:
    """Inclusive range of every loop variable the C code uses (for the
    printer's proofs): the kernel's, a matrix product's window loops and flat
    indices."""
    out = kernel.ranges()
    g = sched.gemm
    if g is not None:
        out.update({lp.var: (lp.first, lp.last) for lp in g.k})
        out.update(g.ranges())
    return out
