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

The indices are written here in the document's order; the match finds each
loop's role from how it indexes the reads and the output (plainly, or as a
row or column shifted by a window loop), so any order matches, channels last
(``x[b, i + di, j + dj, c]``, weights ``w[di, dj, c, o]``) too.  Anything else
(dilation, stride, another window, a guard the zero padding does not
explain, a coefficient or epilogue) is not matched and keeps its direct
kernel.  The match records the reads and the store as IR
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
    def origin(self) -> int:
        """Where a data tile starts, in rows and columns from its outputs' first: the
        window's first offset (tap u reads u − 1, ``_tap_value``)."""
        return TAPS[0] - 1

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
    """The kernel's Winograd form, or None where it has none.  Roles are found
    from how the loops index the reads and the output, not from positions: a
    channels-last layer (``x[b, i + di, j + dj, c]``) matches as well."""
    split = _split(kernel)
    if split is None:
        return None
    stage, r, reads, guards = split
    if len(kernel.parallel) != 4 or len(r.limits) != 3:
        return None
    for data, other in (reads, reads[::-1]):
        if len(data.indices) != 4:
            continue
        found = _data_form(kernel, stage, data, other, guards) or _filter_form(kernel, stage, data, other, guards)
        if found is not None:
            return found
    return None


def _plain(index, loops) -> Loop | None:
    """The loop ``index`` is exactly, or None."""
    return next((lp for lp in loops if index == lp.var), None)


def _data_roles(data: sp.Indexed, plain_loops, spatial_loops, window_loops):
    """D's dims by role: (batch or channel loops read plainly, by position), and
    per spatial dim (position, spatial loop, window loop, (s, a)); None unless
    D reads exactly two plain loops and two windowed rows/columns."""
    plain, spatial = {}, []
    for d, index in enumerate(data.indices):
        lp = _plain(index, plain_loops)
        if lp is not None:
            plain[d] = lp
            continue
        hits = [(sl, wl) for sl in spatial_loops for wl in window_loops
                if index.free_symbols == {sl.var, wl.var}]
        if len(hits) != 1:
            return None
        sl, wl = hits[0]
        mapped = _window_map(index, wl.var, wl, sl.var)
        if mapped is None:
            return None
        spatial.append((d, sl, wl, mapped))
    if len(plain) != 2 or len(spatial) != 2 or len({s[1].var for s in spatial} | {s[2].var for s in spatial}) != 4:
        return None
    return plain, spatial


def _renamed(read: sp.Indexed, names: dict, spatial: list) -> sp.Indexed:
    """``read`` at the template's index names: loops by ``names``, the spatial
    dims (``spatial``: position, ...) at ROW and COL."""
    out = [ix.xreplace(names) for ix in read.indices]
    for (d, *_), name in zip(spatial, (ROW, COL)):
        out[d] = name
    return read.base[tuple(out)]


def _same_size(t, spatial) -> bool:
    """D's rows and columns are as many as the spatial loops run (stride 1, "same")."""
    return all(sp.simplify(t.shape[d] - sl.extent) == 0 for d, sl, _, _ in spatial)


def _data_form(kernel, stage, data, other, guards) -> WinogradMatch | None:
    r = stage.reductions[0]
    windows = [lp for lp in r.limits if lp.constant and lp.extent == 3]
    channels = [lp for lp in r.limits if lp not in windows]
    if len(windows) != 2 or len(channels) != 1:
        return None
    (c,) = channels
    roles = _data_roles(data, [*kernel.parallel, c], kernel.parallel, windows)
    if roles is None:
        return None
    plain, spatial = roles
    t = kernel.tensors[str(data.base.label)]
    if c not in plain.values() or guards != _inside(data, t, [d for d, *_ in spatial]) or not _same_size(t, spatial):
        return None
    (b,) = [lp for lp in plain.values() if lp is not c]
    (i, wi, mi), (j, wj, mj) = ((sl, wl, m) for _, sl, wl, m in spatial)
    (o,) = [lp for lp in kernel.parallel if lp not in (b, i, j)]
    if not _zero_loops((b, o, i, j, c)) or set(stage.lhs) != {b.var, o.var, i.var, j.var} \
            or len(stage.lhs) != 4 or other.free_symbols & {b.var, i.var, j.var}:
        return None
    names = {o.var: OUT_CHANNEL, c.var: IN_CHANNEL}
    taps = tuple(tuple(other.xreplace({**names, wi.var: _tap_value(*mi, u),
                                       wj.var: _tap_value(*mj, v)}) for v in TAPS) for u in TAPS)
    store = sp.IndexedBase(stage.tensor.name)[tuple(stage.lhs)].xreplace(
        {b.var: BATCH, o.var: OUT_CHANNEL, i.var: ROW, j.var: COL})
    return WinogradMatch("data", b, o, c, i, j, _renamed(data, {b.var: BATCH, c.var: IN_CHANNEL}, spatial),
                         _inside_test(t, spatial), taps, None, None, (store,))


def _filter_form(kernel, stage, data, grad, guards) -> WinogradMatch | None:
    r = stage.reductions[0]
    windows = [lp for lp in kernel.parallel if lp.constant and lp.extent == 3]
    if len(windows) != 2:
        return None
    roles = _data_roles(data, [*kernel.parallel, *r.limits], list(r.limits), windows)
    if roles is None:
        return None
    plain, spatial = roles
    t = kernel.tensors[str(data.base.label)]
    (i, wi, mi), (j, wj, mj) = ((sl, wl, m) for _, sl, wl, m in spatial)
    batches = [lp for lp in plain.values() if lp in r.limits]
    chans = [lp for lp in plain.values() if lp in kernel.parallel and lp not in windows]
    if len(batches) != 1 or len(chans) != 1 or guards != _inside(data, t, [d for d, *_ in spatial]) \
            or not _same_size(t, spatial):
        return None
    (b,), (c,) = batches, chans
    (o,) = [lp for lp in kernel.parallel if lp not in (c, wi, wj)]
    if not _zero_loops((o, c, b, i, j)) or len(stage.lhs) != 4 \
            or set(stage.lhs) != {o.var, c.var, wi.var, wj.var}:
        return None
    # G reads b, o, i, j plainly, each once
    g_plain = [_plain(ix, (b, o, i, j)) for ix in grad.indices]
    if len(grad.indices) != 4 or None in g_plain or len(set(lp.var for lp in g_plain)) != 4:
        return None
    g_tensor = kernel.tensors[str(grad.base.label)]
    g_spatial = [(d, lp, None, None) for d, lp in enumerate(g_plain) if lp in (i, j)]
    if [lp for _, lp, _, _ in g_spatial] != [i, j] or not _same_size(g_tensor, g_spatial):
        return None
    names = {o.var: OUT_CHANNEL, c.var: IN_CHANNEL}
    store = sp.IndexedBase(stage.tensor.name)[tuple(stage.lhs)]
    stores = tuple(tuple(store.xreplace({**names, wi.var: _tap_value(*mi, u),
                                         wj.var: _tap_value(*mj, v)}) for v in TAPS) for u in TAPS)
    gradient = grad.xreplace({b.var: BATCH, o.var: OUT_CHANNEL, i.var: ROW, j.var: COL})
    return WinogradMatch("filter", b, o, c, i, j, _renamed(data, {b.var: BATCH, c.var: IN_CHANNEL}, spatial),
                         _inside_test(t, spatial), (), gradient, _inside_test(g_tensor, g_spatial), stores)


def _inside_test(t, spatial) -> sp.Expr:
    """ROW, COL inside the tensor's rows and columns (``spatial``: their dims first):
    the zero padding's test."""
    (dr, *_), (dc, *_) = spatial
    lo_r, lo_c = t.lower[dr], t.lower[dc]
    return sp.And(ROW >= lo_r, ROW <= lo_r + t.shape[dr] - 1, COL >= lo_c, COL <= lo_c + t.shape[dc] - 1)


__all__ = ["WinogradMatch", "match", "BATCH", "OUT_CHANNEL", "IN_CHANNEL", "ROW", "COL"]
