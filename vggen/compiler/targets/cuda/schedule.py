"""CUDA schedule of a contraction as a tiled implicit GEMM (``cuda/contraction_tiled.cu.j2``).

A contraction ``Y[out] = value(Σ_red coeff·A[f(out, red)]·B[g(out, red)])``
whose two operands each miss some output index is a matrix product

    C[m, n] = Σ_k A[m, k]·B[k, n]

with ``m`` the output loops only A reads, ``n`` those only B reads (B holds
the output's last, contiguous index), ``k`` every loop of the Σ, the
constant window included (conv: k = (ic, di, dj), K = 9·IC).  Each of m, n,
k is flattened row-major (first index slowest).  Nothing is materialised:
each block gathers BM×BK of A and BK×BN of B straight from the tensors
through the IR's printed index maps and range guards (0 where a guard
fails: the zero padding), so the im2col matrix never exists.

Schedule (one block of ``THREADS`` threads per work item; the grid strides
over the items, so any grid size is correct):

* **Tiles.**  A ``TileConfig`` is BM×BN outputs per block, BK k per step,
  TM×TN outputs per thread (register blocking).  Thread (tx, ty) owns rows
  ``g·4·TY + 4·ty + q`` and columns ``h·4·TX + 4·tx + q`` (q < 4): float4
  reads of shared memory, conflict-free.  Shared tiles are k-major,
  ``As[BK][BM + 4]``, ``Bs[BK][BN + 4]`` (the pad keeps float4 alignment
  and spreads a k-contiguous gather's stores over the banks).
* **Pipeline.**  Two shared buffers; the global loads of step t+1 go into
  registers before the FMAs of step t and are stored to the other buffer
  after them (with 8×8 per thread before them: no room beside the 64
  accumulators; the other warps' FMAs cover the latency): one
  ``__syncthreads`` per k step.  Each configuration is a ``__noinline__``
  instantiation, so each gets its own register allocation (≤ 128, none
  spilled: ``tests/compiler/test_cuda_compile.py``).
* **Gather.**  Per operand and k step a thread loads KE consecutive k of
  one row (or, vectorised along the rows, of V consecutive rows): its
  row's loop variables are unflattened once per item, its first k's are
  counters advanced by BK with carries (no division), the others follow
  by +1 carries.  Consecutive threads run along the dim the tensor is
  contiguous in (``along``: "k" or "rows"), so a warp's loads coalesce.
  Where the operand's flat offset is linear in that dim (``linear``:
  offset = base + flat index, no guard; Linear's x and w, conv's w in the
  forward), V = 4 (or 2) consecutive elements come with one float4
  (float2) load, scalar loads at run time where the address is not
  aligned or the run crosses the end.
* **Split-K.**  An item is (tile, z); split z sums k-steps
  ``[z·S, (z+1)·S)``.  With several splits each writes its partial tile to
  a workspace (``vg_splitk_ws``, module scope) and bumps the tile's
  counter (``vg_splitk_count``, an int atomic: no float atomics); the last
  to arrive sums the partials **in z order** (deterministic, whatever the
  arrival order), applies the stage's value (the epilogue) and stores,
  then resets the counter for the next launch.  Kernels of one module
  share the workspace: they must not run concurrently (one stream).
  ``SPLIT_K = False`` removes all of it (no atomic at all).
* **Choice.**  The kernel picks (config, splits) itself from M, N, K and
  ``gridDim.x`` (the blocks assumed resident: ``PERSISTENT_BLOCKS``) with
  the cost model of ``choose`` (``vg_tile_choose`` is its C++ mirror: the
  table and constants are rendered from here, the arithmetic is written out
  in ``_tiled.cu.j2`` and tested equal, ``tests/compiler/test_cuda_emulation.py``), unless a choice was measured for that (M, N, K):
  ``vggen tune`` (:mod:`vggen.tools.tune`) times every candidate of the network's
  products on the GPU and records the fastest in ``generated/tuning.json``;
  the build compiles those records into a table in the kernel
  (``vg_tuned_<kernel>``) and lists them in the manifest (``launch.tuned``).
  ``vg_tune_<kernel>`` (a ``__device__ int``, 0 by default) forces a choice
  over both: the hook the tuner times candidates through (``tune_value``).

The template holds loop structure, staging and launch only: every element of
A and B, and the stored value, is printed from the IR by the CUDA printer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from vggen.compiler.analysis import split_product
from vggen.compiler.ir import Kernel, KernelClass, Loop
from vggen.compiler.symbolic import conjuncts, flat_offset, unit_coeff_last
from vggen.compiler.targets.cuda.constants import RESIDENT_BLOCKS, THREADS

# The blocks assumed resident: the manifest's grid; any other grid is correct too.
PERSISTENT_BLOCKS = RESIDENT_BLOCKS
MIN_BLOCKS_PER_SM = 2            # __launch_bounds__(VG_THREADS, 2): at most 128 registers
# Split-K (see the module docstring).  Its only atomic is the int ticket of the
# last split; False: no split-K, no workspace, no atomic at all (small M×N
# products then run on few blocks).
SPLIT_K = True
SPLITK_FLOATS = 1 << 22          # workspace of partial tiles (16 MiB per module)
SPLITK_TILES = 4096              # tile counters: split-K only with at most this many tiles
MAX_SPLITS = 128
KT_MIN = 4                       # k-steps a split should have at least
# cost model (units of 1/256 instruction per thread): see choose()
COST_FIXED = 400                 # per item: prologue latency, index set-up
COST_GATHER = 12                 # per gathered element per thread
COST_REDUCE = 2                  # per partial element the last split reads


@dataclass(frozen=True)
class TileConfig:
    bm: int
    bn: int
    bk: int
    tm: int
    tn: int
    split: bool = True             # may split K (else its registers are all the FMAs')

    @property
    def ty(self) -> int:
        return self.bm // self.tm

    @property
    def tx(self) -> int:
        return self.bn // self.tn

    @property
    def smem_floats(self) -> int:
        """Both operands' double-buffered tiles, rows padded by 4."""
        return 2 * self.bk * (self.bm + 4 + self.bn + 4)

    def rows(self, dim: str) -> int:
        return self.bm if dim == "m" else self.bn

    def check(self):
        assert self.ty * self.tx == THREADS and self.tm % 4 == 0 and self.tn % 4 == 0, self
        # every thread gathers ≥ 1 element of each operand per k step, within one row group
        assert all(r * self.bk % THREADS == 0 and r * self.bk // THREADS <= self.bk for r in (self.bm, self.bn)), self
        assert self.smem_floats * 4 <= 48 * 1024, self

    def text(self) -> str:
        return f"{self.bm}x{self.bn}x{self.bk}, {self.tm}x{self.tn} per thread{'' if self.split else ', no split-K'}"


# Order matters only for ties (the first wins).  Edit here; `vggen build`.
CONFIGS = (
    TileConfig(128, 128, 8, 8, 8, split=False),     # 8×8 per thread fills 128 registers
    TileConfig(128, 64, 16, 8, 4),
    TileConfig(64, 128, 16, 4, 8),
    TileConfig(64, 64, 16, 4, 4),
    TileConfig(128, 32, 16, 4, 4),
    TileConfig(32, 128, 16, 4, 4),
)
for _c in CONFIGS:
    _c.check()


# --------------------------------------------------------------------------- the choice (mirrored in C++)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def usable_splits(c: TileConfig, M: int, N: int, K: int, want: int) -> int:
    """``want`` splits clamped to what the workspace, the counters and K allow,
    then normalised so that none is empty."""
    tiles = _cdiv(M, c.bm) * _cdiv(N, c.bn)
    kt = _cdiv(K, c.bk)
    s = max(1, min(want, MAX_SPLITS, kt))
    if s > 1 and (tiles > SPLITK_TILES or not c.split or not SPLIT_K):
        s = 1
    if s > 1:
        s = max(1, min(s, SPLITK_FLOATS // (tiles * c.bm * c.bn)))
    return _cdiv(kt, _cdiv(kt, s))


def cost(c: TileConfig, M: int, N: int, K: int, G: int, s: int) -> int:
    """Estimated time (arbitrary units) of the product with config ``c`` and
    ``s`` splits on ``G`` resident blocks: waves of items, each its k-steps
    (FMAs, shared loads, gathers per thread) plus a fixed cost, plus the
    last split's summation of the partials."""
    tiles = _cdiv(M, c.bm) * _cdiv(N, c.bn)
    kt = _cdiv(K, c.bk)
    per_k = 256 * c.tm * c.tn + 128 * (c.tm + c.tn) + COST_GATHER * (c.bm + c.bn)
    item = _cdiv(kt, s) * c.bk * per_k + 256 * (COST_FIXED + 2 * c.tm * c.tn * (2 if s > 1 else 1))
    total = _cdiv(tiles * s, G) * item
    if s > 1:
        total += 256 * COST_REDUCE * s * c.tm * c.tn
    return total


def choose(M: int, N: int, K: int, G: int = PERSISTENT_BLOCKS, tune: int = 0) -> tuple[int, int]:
    """(config index, splits) for an M×N×K product on G blocks (the kernel
    runs the same code, ``vg_tile_choose``).  ``tune`` > 0 forces config
    ``(tune−1) % len(CONFIGS)`` with ``(tune−1) // len(CONFIGS) + 1`` splits
    (clamped like any choice)."""
    if tune > 0:
        c = (tune - 1) % len(CONFIGS)
        return c, usable_splits(CONFIGS[c], M, N, K, (tune - 1) // len(CONFIGS) + 1)
    best = None
    for n, c in enumerate(CONFIGS):
        tiles = _cdiv(M, c.bm) * _cdiv(N, c.bn)
        want = max(1, min(G // tiles, _cdiv(K, c.bk) // KT_MIN))
        for w in (1, want) if want > 1 else (1,):
            s = usable_splits(c, M, N, K, w)
            t = cost(c, M, N, K, G, s)
            if best is None or t < best[0]:
                best = (t, n, s)
    return best[1], best[2]


def tune_value(config: int, splits: int = 1) -> int:
    """The ``vg_tune_<kernel>`` value that forces ``config`` with ``splits``."""
    return 1 + config + len(CONFIGS) * (splits - 1)


# --------------------------------------------------------------------------- the GEMM view of a kernel


def _flat(loops: list[Loop]) -> sp.Expr:
    """The row-major flat index of ``loops`` (first index slowest)."""
    out = sp.Integer(0)
    for lp in loops:
        out = out * lp.extent + (lp.var - lp.first)
    return sp.expand(out)


LOAD = sp.Symbol("vg_ld", real=True)    # an operand element just loaded (linear gathers)


@dataclass
class Operand:
    """One operand of the product: its element ``expr`` (guards included) as a
    function of its ``rows`` loops (m for A, n for B) and the k loops."""

    name: str                      # "a" or "b"
    dim: str                       # "m" or "n"
    rows: list[Loop]
    k: list[Loop]
    expr: sp.Expr
    access: sp.Indexed
    tensor: str
    along: str                     # "k" or "rows": the dim consecutive threads load along
    linear: bool                   # offset = base + flat index along ``along``, no guard
    flat0: sp.Expr | None = None   # that base (the offset with ``along``'s loops at their first)
    load: sp.Expr | None = None    # the element from the loaded value LOAD (a coefficient)

    def vec(self, c: TileConfig) -> int:
        """Elements per vector load (4, 2 or 1) with config ``c``: >1 only for a
        linear operand, dividing its elements per thread and step
        (``c.rows(dim)·BK / THREADS``, see the template's mapping)."""
        per_thread = c.rows(self.dim) * c.bk // THREADS
        for v in (4, 2):
            if self.linear and per_thread % v == 0 and c.rows(self.dim) % v == 0:
                return v
        return 1

    def row_vars(self) -> list[sp.Symbol]:
        """Row loop variables the element reads (the rest need no register)."""
        free = self.expr.free_symbols
        return [lp.var for lp in self.rows if lp.var in free]

    def k_vars(self) -> list[sp.Symbol]:
        free = self.expr.free_symbols
        return [lp.var for lp in self.k if lp.var in free]

    def flat0_vars(self, loops: list[Loop]) -> list[sp.Symbol]:
        free = self.flat0.free_symbols
        return [lp.var for lp in loops if lp.var in free]

    def text(self) -> str:
        e = self.expr
        if isinstance(e, sp.Piecewise):
            val, cond = e.args[0]
            return f"{val} where {' and '.join(str(c) for c in conjuncts(cond))}, else 0"
        return str(e)


# --------------------------------------------------------------------------- measured choices


TUNING_FILE = "tuning.json"      # beside the manifest; an input of the build


@dataclass(frozen=True)
class Tuned:
    """A measured choice: the product M×N×K runs ``tune`` (see ``tune_value``)."""

    m: int
    n: int
    k: int
    tune: int
    ms: float | None = None            # its time, and the heuristic's, when measured
    heuristic_ms: float | None = None

    @property
    def config(self) -> int:
        return (self.tune - 1) % len(CONFIGS)

    @property
    def splits(self) -> int:
        """The splits the kernel will run (the request clamped like any choice)."""
        return usable_splits(CONFIGS[self.config], self.m, self.n, self.k, (self.tune - 1) // len(CONFIGS) + 1)

    def as_dict(self) -> dict:
        out = {"M": self.m, "N": self.n, "K": self.k, "tune": self.tune}
        if self.ms is not None:
            out.update(ms=self.ms, heuristic_ms=self.heuristic_ms)
        return out


@dataclass
class Tuning:
    """The records of ``tuning.json``: per kernel its measured choices."""

    device: str = ""
    kernels: dict = field(default_factory=dict)     # kernel name -> [Tuned], sorted by (M, N, K)

    def for_kernel(self, name: str) -> tuple:
        return tuple(self.kernels.get(name, ()))

    def as_json(self) -> dict:
        return {"device": self.device, "configs": len(CONFIGS),
                "kernels": {name: [t.as_dict() for t in entries]
                            for name, entries in sorted(self.kernels.items()) if entries}}


def parse_tuning(data, where: str = TUNING_FILE) -> Tuning:
    """A Tuning from the JSON object of ``tuning.json``; a VggenError naming
    ``where`` and the bad field otherwise."""
    from vggen.errors import VggenError

    def bad(what):
        return VggenError(f"{where}: {what}; rerun `vggen tune` or delete the file")

    if not isinstance(data, dict) or not isinstance(data.get("kernels"), dict):
        raise bad("not a tuning record (no \"kernels\" object)")
    if data.get("configs") != len(CONFIGS):
        raise bad(f"measured with {data.get('configs')} tile configurations, the schedule has {len(CONFIGS)}")
    out = Tuning(str(data.get("device", "")))
    for name, entries in data["kernels"].items():
        if not isinstance(entries, list):
            raise bad(f"kernel {name}: entries must be a list")
        seen, parsed = set(), []
        for e in entries:
            try:
                t = Tuned(int(e["M"]), int(e["N"]), int(e["K"]), int(e["tune"]),
                          e.get("ms"), e.get("heuristic_ms"))
            except (TypeError, KeyError, ValueError):
                raise bad(f"kernel {name}: entry {e!r} needs integer M, N, K and tune") from None
            if min(t.m, t.n, t.k) < 1 or not 1 <= t.tune <= len(CONFIGS) * MAX_SPLITS:
                raise bad(f"kernel {name}: entry {e!r} is out of range")
            if (t.m, t.n, t.k) in seen:
                raise bad(f"kernel {name}: two entries for M={t.m}, N={t.n}, K={t.k}")
            seen.add((t.m, t.n, t.k))
            parsed.append(t)
        out.kernels[name] = sorted(parsed, key=lambda t: (t.m, t.n, t.k))
    return out


def load_tuning(path) -> Tuning | None:
    """The tuning record at ``path``, or None where there is none."""
    import json
    from pathlib import Path

    from vggen.errors import VggenError

    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VggenError(f"{path}: cannot read the tuning record ({e}); rerun `vggen tune` or delete it") from None
    return parse_tuning(data, str(path))


@dataclass
class TiledGemm:
    """A contraction kernel's tiled-GEMM schedule (see the module docstring)."""

    m: list[Loop]
    n: list[Loop]
    k: list[Loop]
    a: Operand
    b: Operand
    configs: tuple = CONFIGS
    vec: list = field(default_factory=list)     # per config: (V of A, V of B)
    tuned: tuple = ()                           # measured choices (Tuned), compiled into the kernel
    tuned_on: str = ""                          # the GPU they were measured on

    def loops(self, dim: str) -> list[Loop]:
        return {"m": self.m, "n": self.n, "k": self.k}[dim]

    def size(self, dim: str) -> sp.Expr:
        return sp.Mul(*[lp.extent for lp in self.loops(dim)])

    @property
    def smem_floats(self) -> int:
        return max(c.smem_floats for c in self.configs)

    @property
    def split_k(self) -> bool:
        """Whether any configuration may split K (the template emits split-K then)."""
        return SPLIT_K and any(c.split for c in self.configs)

    def ranges(self) -> dict:
        return {lp.var: (lp.first, lp.last) for lp in self.m + self.n + self.k}

    def names(self, dim: str) -> list[str]:
        return [lp.var.name for lp in self.loops(dim)]


def _operand(name: str, dim: str, rows: list[Loop], k: list[Loop], expr, access, tensor, guarded: bool,
             coeff) -> Operand:
    by_rows, by_k = unit_coeff_last(access, rows[-1].var), unit_coeff_last(access, k[-1].var)
    if by_rows and by_k:          # both contiguous: the one whose run is not a constant window
        along = "k" if rows[-1].constant and not k[-1].constant else "rows"
    else:
        along = "k" if by_k else "rows"
    op = Operand(name, dim, rows, k, expr, access, tensor.name, along, False)
    if not guarded:
        loops = k if along == "k" else rows
        offset = flat_offset(access, tensor)
        base = sp.expand(offset.xreplace({lp.var: lp.first for lp in loops}))
        if sp.expand(offset - base - _flat(loops)) == 0:
            op.linear, op.flat0, op.load = True, base, coeff * LOAD
    return op


def tiled_gemm(kernel: Kernel) -> TiledGemm | None:
    """The kernel as a tiled product, or None where it is not one (then the
    simple thread/block schedule is the only one): not a single Σ of a guarded
    product of two float tensors with constant coefficient, an output index
    both operands read (a batch index) or neither, a guard that reads both
    operands' output loops."""
    if kernel.cls is not KernelClass.CONTRACTION or len(kernel.stages) != 1:
        return None
    (r,) = kernel.reductions
    if r.op != "sum" or r.term is None:
        return None
    p = split_product(kernel.parallel, r.term, list(r.limits or []))
    tensors = kernel.tensors
    if p is None or any(tensors[str(x.base.label)].dtype != "float" for x in (p.a_read, p.b_read)):
        return None
    g = TiledGemm(p.m, p.n, p.k,
                  _operand("a", "m", p.m, p.k, p.a, p.a_read, tensors[str(p.a_read.base.label)],
                           p.a_guarded, p.coeff),
                  _operand("b", "n", p.n, p.k, p.b, p.b_read, tensors[str(p.b_read.base.label)],
                           p.b_guarded, 1))
    g.vec = [(g.a.vec(cfg), g.b.vec(cfg)) for cfg in g.configs]
    return g


# --------------------------------------------------------------------------- manifest


def launch(g: TiledGemm, name: str) -> dict:
    """The manifest's launch entry of a tiled kernel (besides the common fields)."""
    return {
        "mode": "tiled",
        "grid": [str(PERSISTENT_BLOCKS), "1", "1"],
        "grid_any": True,
        "static_shared_bytes": 4 * g.smem_floats + 4,
        "gemm": {"m": g.names("m"), "n": g.names("n"), "k": g.names("k"),
                 "M": str(g.size("m")), "N": str(g.size("n")), "K": str(g.size("k")),
                 "a": g.a.tensor, "b": g.b.tensor, "a_along": g.a.along, "b_along": g.b.along},
        "split_k": g.split_k,
        "workspace": ({"symbol": "vg_splitk_ws", "bytes": 4 * SPLITK_FLOATS, "counters": "vg_splitk_count",
                       "scope": "module: shared by the file's tiled kernels, which must not run concurrently"}
                      if g.split_k else None),
        "configs": [{"BM": c.bm, "BN": c.bn, "BK": c.bk, "TM": c.tm, "TN": c.tn, "VA": va, "VB": vb,
                     "split": c.split and g.split_k}
                    for c, (va, vb) in zip(g.configs, g.vec)],
        "tuned": {"device": g.tuned_on,
                  "choices": [{**t.as_dict(), "config": t.config, "splits": t.splits} for t in g.tuned]}
        if g.tuned else None,
        "tune": {"symbol": f"vg_tune_{name}", "default": 0,
                 "encoding": f"0: the kernel's heuristic; 1 + config + {len(g.configs)}*(splits - 1): force "
                             f"configs[config] with that many k-splits (clamped to the workspace)"},
    }


__all__ = ["CONFIGS", "PERSISTENT_BLOCKS", "TileConfig", "TiledGemm", "Operand", "choose", "cost",
           "tiled_gemm", "tune_value", "launch", "Tuned", "Tuning", "parse_tuning", "load_tuning",
           "TUNING_FILE"]
