"""Which contractions Winograd minimal filtering may run: 3×3, stride-1,
zero-padded 2-D correlations, found in the kernel IR (not by layer name).

Two forms occur (``vggen.derive.winograd`` proves both equal to eq. 1 and its
gradients):

* **data** — ``out[b, o, i, j] = Σ_{c, di, dj} F(o, c, di, dj) · D[b, c, i + sᵢ·di + aᵢ, j + sⱼ·dj + aⱼ]``
  with the window's offsets ``{s·d + a}`` = {−1, 0, 1} and zero outside D:
  the forward (F = w) and ∂L/∂x (D = ∂L/∂y, F = w read flipped and
  transposed).  Run as F(m×m, 3×3): the filter at tap (u, v), u, v ∈ 0..2,
  is F at ``di = sᵢ·(u − 1 − aᵢ)``, ``dj`` likewise.
* **filter** — ``out(o, c, di, dj) = Σ_{b, i, j} G[b, o, i, j] · D[b, c, i + sᵢ·di + aᵢ, j + sⱼ·dj + aⱼ]``:
  ∂L/∂w.  Run as F(3×3, m×m): each m×m tile of G is the filter, the
  (m + 2)×(m + 2) tile of D under it the data.

Anything else (dilation, stride, another window, a guard the zero padding
does not explain, a coefficient or epilogue) is not matched and keeps its
direct kernel.  The match records the reads and the store as IR
expressions over the template's own index names, so that the target prints
them (``vggen.compiler.targets.c.winograd``) rather than knowing a layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from vggen.compiler.analysis import guarded_factors
from vggen.compiler.ir import Kernel, KernelClass, Loop
from vggen.compiler.symbolic import nonneg

# The names a Winograd kernel's loops give the indices it prints reads with.
BATCH, OUT_CHANNEL, IN_CHANNEL = (sp.Symbol(n, integer=True) for n in ("vg_wb", "vg_wo", "vg_wc"))
ROW, COL = sp.Symbol("vg_wr", integer=True), sp.Symbol("vg_ws", integer=True)
TAPS = (0, 1, 2)


@dataclass(frozen=True)
class WinogradMatch:
    """A contraction that Winograd's algorithm can run (see the module docstring)."""

    form: str                     # "data" or "filter"
    batch: Loop                   # b
    out_channel: Loop             # o (the output's channel in the data form; G's in the filter form)
    in_channel: Loop              # c (D's channel)
    rows: Loop                    # i over D's rows (0 .. H − 1)
    cols: Loop                    # j over D's columns
    data: sp.Expr                 # D[b, c, ROW, COL] (unguarded: the kernel guards the padding)
    data_inside: sp.Expr          # ROW, COL inside D
    taps: tuple                   # data form: F(o, c) at tap (u, v), 3×3 nested tuples
    gradient: sp.Expr | None      # filter form: G[b, o, ROW, COL]
    gradient_inside: sp.Expr | None   # filter form: ROW, COL inside G
    stores: tuple                 # data form: (out[b, o, ROW, COL],); filter form: out(o, c) per tap, 3×3

    @property
    def sizes(self) -> dict:
        """Extents by role: B, C (D's channels), O, H, W."""
        return {"B": self.batch.extent, "C": self.in_channel.extent, "O": self.out_channel.extent,
                "H": self.rows.extent, "W": self.cols.extent}


def _window_map(index, var, window: Loop, spatial) -> tuple | None:
    """(s, a) where ``index`` = spatial + s·var + a, s = ±1, and the window's
    offsets s·d + a over d are exactly −1, 0, 1; None otherwise."""
    rest = sp.expand(index - spatial)
    s = rest.coeff(var)
    a = sp.expand(rest - s * var)
    if s not in (1, -1) or a.free_symbols or not window.constant or window.extent != 3:
        return None
    offsets = {int(s * d + a) for d in range(int(window.first), int(window.last) + 1)}
    return (int(s), int(a)) if offsets == {-1, 0, 1} else None


def _tap_value(s: int, a: int, u: int) -> int:
    """The window index d with s·d + a = u − 1 (tap u)."""
    return s * (u - 1 - a)


def _inside(read: sp.Indexed, tensor, dims) -> set:
    """The range guards (as e ≥ 0) that keep ``read``'s ``dims`` inside ``tensor``."""
    out = set()
    for d in dims:
        ix, lo, n = read.indices[d], tensor.lower[d], tensor.shape[d]
        out |= {sp.expand(ix - lo), sp.expand(lo + n - 1 - ix)}
    return out


def _split(kernel: Kernel):
    """The one reduction's two reads and guards, or None."""
    if kernel.cls is not KernelClass.CONTRACTION or len(kernel.stages) != 1:
        return None
    stage = kernel.stages[0]
    if len(stage.reductions) != 1 or stage.value != stage.reductions[0].acc:
        return None
    r = stage.reductions[0]
    if r.op != "sum" or r.term is None:
        return None
    conds, factors = [], []
    if not guarded_factors(r.term, conds, factors) or len(factors) != 2 \
            or not all(isinstance(f, sp.Indexed) for f in factors):
        return None
    guards = [nonneg(c) for c in conds]
    if any(g is None for g in guards):
        return None
    return stage, r, factors, {sp.expand(g) for g in guards}


def _zero_loops(loops) -> bool:
    return all(lp.first == 0 for lp in loops)


def match(kernel: Kernel) -> WinogradMatch | None:
    """The kernel's Winograd form, or None where it has none."""
    split = _split(kernel)
    if split is None:
        return None
    stage, r, reads, guards = split
    par, lim = kernel.parallel, r.limits
    if len(par) != 4 or len(lim) != 3:
        return None
    for data, other in (reads, reads[::-1]):
        t = kernel.tensors[str(data.base.label)]
        if len(data.indices) != 4 or guards != _inside(data, t, (2, 3)):
            continue
        found = _data_form(kernel, stage, data, other, t) or _filter_form(kernel, stage, data, other, t)
        if found is not None:
            return found
    return None


def _data_form(kernel, stage, data, other, t) -> WinogradMatch | None:
    b, o, i, j = kernel.parallel
    c, wi, wj = stage.reductions[0].limits
    if tuple(data.indices[:2]) != (b.var, c.var) or not _zero_loops((b, o, i, j, c)):
        return None
    if tuple(stage.lhs) != (b.var, o.var, i.var, j.var) or (t.shape[2], t.shape[3]) != (i.extent, j.extent):
        return None
    mi, mj = _window_map(data.indices[2], wi.var, wi, i.var), _window_map(data.indices[3], wj.var, wj, j.var)
    if mi is None or mj is None or other.free_symbols & {b.var, i.var, j.var}:
        return None
    names = {o.var: OUT_CHANNEL, c.var: IN_CHANNEL}
    taps = tuple(tuple(other.xreplace({**names, wi.var: _tap_value(*mi, u),
                                       wj.var: _tap_value(*mj, v)}) for v in TAPS) for u in TAPS)
    out = stage.tensor.name
    store = sp.IndexedBase(out)[BATCH, OUT_CHANNEL, ROW, COL]
    return WinogradMatch("data", b, o, c, i, j, data.base[BATCH, IN_CHANNEL, ROW, COL], _inside_test(t),
                         taps, None, None, (store,))


def _filter_form(kernel, stage, data, grad, t) -> WinogradMatch | None:
    o, c, wi, wj = kernel.parallel
    b, i, j = stage.reductions[0].limits
    if tuple(data.indices[:2]) != (b.var, c.var) or not _zero_loops((o, c, b, i, j)):
        return None
    if tuple(grad.indices) != (b.var, o.var, i.var, j.var) or (t.shape[2], t.shape[3]) != (i.extent, j.extent):
        return None
    mi, mj = _window_map(data.indices[2], wi.var, wi, i.var), _window_map(data.indices[3], wj.var, wj, j.var)
    if mi is None or mj is None or tuple(stage.lhs) != (o.var, c.var, wi.var, wj.var):
        return None
    names = {o.var: OUT_CHANNEL, c.var: IN_CHANNEL}
    store = sp.IndexedBase(stage.tensor.name)[tuple(stage.lhs)]
    stores = tuple(tuple(store.xreplace({**names, wi.var: _tap_value(*mi, u),
                                         wj.var: _tap_value(*mj, v)}) for v in TAPS) for u in TAPS)
    gradient = grad.xreplace({b.var: BATCH, o.var: OUT_CHANNEL, i.var: ROW, j.var: COL})
    return WinogradMatch("filter", b, o, c, i, j, data.base[BATCH, IN_CHANNEL, ROW, COL], _inside_test(t),
                         (), gradient, _inside_test(kernel.tensors[str(grad.base.label)]), stores)


def _inside_test(t) -> sp.Expr:
    """ROW, COL inside D's rows and columns (the zero padding's test)."""
    lo_r, lo_c = t.lower[2], t.lower[3]
    return sp.And(ROW >= lo_r, ROW <= lo_r + t.shape[2] - 1, COL >= lo_c, COL <= lo_c + t.shape[3] - 1)


__all__ = ["WinogradMatch", "match", "BATCH", "OUT_CHANNEL", "IN_CHANNEL", "ROW", "COL"]
