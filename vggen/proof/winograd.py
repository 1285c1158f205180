"""Prove each Winograd form equal to the convolution's equations, exactly.

For one tile, the data and the filter are symbols; both sides are polynomials in
them over the rationals (``sympy.polys.rings``: exact, and fast enough to run in
``vggen check``), and a proof is their equality.  The direct side is not written
here: it is the layer's own equation (eq. 1) or the derivation's gradient,
evaluated at the tile's output points with one batch element and one channel
each way (the channel sum is the batched matrix product's, outside the tile).

* forward, F(m×m, 3×3): y over an m×m tile from the (m+2)×(m+2) x tile under it
  and the 3×3 w.  Any x values, so zero padding (data that happen to be 0) is
  covered.
* ∂L/∂x, F(m×m, 3×3) with the flipped filter: the derived
  g_x(i, j) = Σ_{di,dj} [0 ≤ i−di < H, 0 ≤ j−dj < W] w(di, dj) g_y(i−di, j−dj)
  is the correlation Σ_{k,l} w(1−k, 1−l) g_y(i−1+k, j−1+l) of g_y, zero outside,
  with w turned by 180°.  Proved at H = W = m + 1 on the four tiles that touch
  the image's edges, where the derivation's guards are the padding.
* ∂L/∂w, F(3×3, m×m): the derived g_w(di, dj) = Σ_{i,j} g_y(i, j) x(i+di, j+dj)
  with the sum over one m×m tile of g_y (H = W = m) as the filter and the
  (m+2)×(m+2) x tile as the data; ∂L/∂w is the sum of these over tiles, batch
  and channels, a partition of the derivation's sum.

A wrong transform entry makes a difference polynomial nonzero: the proof fails
(tests mutate an entry to see it).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import sympy as sp
from sympy.polys.domains import QQ
from sympy.polys.rings import ring

from vggen.derive.autodiff import derive
from vggen.derive.winograd import WinogradTransforms, forward_transforms, weight_gradient_transforms
from vggen.frontend.layers import IC, OC, B, H, W, convolution2d
from vggen.proof.verify import Row

ALGORITHMS = (2, 4)          # output tile sizes m proved by `vggen check`


def _matrix(ring_, M: sp.Matrix):
    return [[ring_(sp.Rational(M[i, j])) for j in range(M.cols)] for i in range(M.rows)]


def _mul(R, A, Bm):
    return [[sum((A[i][k] * Bm[k][j] for k in range(len(Bm))), R(0)) for j in range(len(Bm[0]))]
            for i in range(len(A))]


def _transpose(M):
    return [list(r) for r in zip(*M)]


def tile_product(R, t: WinogradTransforms, d, g):
    """Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A over the ring ``R``."""
    AT, G, BT = (_matrix(R, M) for M in (t.AT, t.G, t.BT))
    U = _mul(R, _mul(R, G, g), _transpose(G))
    V = _mul(R, _mul(R, BT, d), _transpose(BT))
    M = [[U[i][j] * V[i][j] for j in range(t.n)] for i in range(t.n)]
    return _mul(R, _mul(R, AT, M), _transpose(AT))


def _symbols(prefix, rows, cols):
    return [[sp.Symbol(f"{prefix}{i}_{j}") for j in range(cols)] for i in range(rows)]


def _direct(rhs, at: dict, accesses) -> sp.Expr:
    """``rhs`` at the point ``at`` (every size and free index an integer), its sums
    expanded term by term, each tensor access replaced by ``accesses[name](indices)``
    (a tile symbol, or 0 outside the image).  ``xreplace`` with integers settles
    the derivation's guards; it is much faster than ``Sum.doit``."""
    def expand(e):
        if isinstance(e, sp.Sum):
            names = [v for v, _, _ in e.limits]
            ranges = [range(int(lo), int(hi) + 1) for _, lo, hi in e.limits]
            return sp.Add(*[expand(e.function.xreplace(dict(zip(names, map(sp.Integer, point)))))
                            for point in itertools.product(*ranges)])
        return e.func(*[expand(a) for a in e.args]) if e.args else e
    value = expand(rhs.xreplace({k: sp.Integer(v) for k, v in at.items()}))
    return value.replace(lambda e: isinstance(e, sp.Indexed),
                         lambda e: accesses[str(e.base.label)](tuple(int(v) for v in e.indices)))


def _differences(t: WinogradTransforms, data, filt, expected) -> list:
    """Every nonzero (Winograd − expected) entry, as (row, column, polynomial);
    ``data`` may hold zeros (padding)."""
    R, *_ = ring([s for rows in data + filt for s in rows if isinstance(s, sp.Symbol)], QQ)
    lift = lambda M: [[R(v) for v in row] for row in M]
    got = tile_product(R, t, lift(data), lift(filt))
    return [(i, j, got[i][j] - R(expected[i][j])) for i in range(t.m) for j in range(t.m)
            if got[i][j] != R(expected[i][j])]


def prove_forward(t: WinogradTransforms) -> list:
    """Differences of F(m×m, 3×3) from eq. 1 on one tile (empty: proved)."""
    eq = convolution2d(1).equations[0]
    b, oc, i, j = eq.lhs.indices
    d, g = _symbols("x", t.n, t.n), _symbols("w", 3, 3)
    accesses = {"x": lambda ix: d[ix[2] + 1][ix[3] + 1], "w": lambda ix: g[ix[2] + 1][ix[3] + 1]}
    rhs = eq.rhs.xreplace({IC: sp.Integer(1)})
    expected = [[_direct(rhs, {b: 0, oc: 0, i: p, j: q}, accesses) for q in range(t.m)] for p in range(t.m)]
    return _differences(t, d, g, expected)


@lru_cache(maxsize=None)
def _convolution_gradient(of: str):
    """The derivation's equation for ∂L/∂``of`` of the 3×3 convolution."""
    return next(gr.equation for gr in derive(convolution2d(1)).gradients if gr.of.name == of)


def prove_input_gradient(t: WinogradTransforms) -> list:
    """Differences of F(m×m, 3×3) on g_y with w flipped from the derived g_x, on the
    four tiles of an (m+1)×(m+1) image (each touches two of its edges)."""
    eq = _convolution_gradient("x")
    b, ic, i, j = eq.lhs.indices
    size = t.m + 1
    rhs = eq.rhs.xreplace({OC: sp.Integer(1), H: sp.Integer(size), W: sp.Integer(size)})
    w = _symbols("w", 3, 3)
    flipped = [[w[2 - k][2 - l] for l in range(3)] for k in range(3)]
    out = []
    for i0 in (0, 1):
        for j0 in (0, 1):
            def gy(ix, i0=i0, j0=j0):
                u, v = ix[2] - i0 + 1, ix[3] - j0 + 1
                inside = 0 <= ix[2] < size and 0 <= ix[3] < size
                return sp.Symbol(f"gy{u}_{v}") if inside else 0
            accesses = {"g_y": gy, "w": lambda ix: w[ix[2] + 1][ix[3] + 1]}
            expected = [[_direct(rhs, {b: 0, ic: 0, i: i0 + p, j: j0 + q}, accesses) for q in range(t.m)]
                        for p in range(t.m)]
            data = [[sp.Symbol(f"gy{u}_{v}") if 0 <= i0 - 1 + u < size and 0 <= j0 - 1 + v < size else 0
                     for v in range(t.n)] for u in range(t.n)]
            out += _differences(t, data, flipped, expected)
    return out


def prove_weight_gradient(t: WinogradTransforms) -> list:
    """Differences of F(3×3, m×m) from the derived g_w summed over one m×m tile."""
    eq = _convolution_gradient("w")
    oc, ic, di, dj = eq.lhs.indices
    m = t.r                                      # the g_y tile is the "filter"
    rhs = eq.rhs.xreplace({B: sp.Integer(1), H: sp.Integer(m), W: sp.Integer(m)})
    x, gy = _symbols("x", t.n, t.n), _symbols("gy", m, m)
    accesses = {"x": lambda ix: x[ix[2] + 1][ix[3] + 1], "g_y": lambda ix: gy[ix[2]][ix[3]]}
    expected = [[_direct(rhs, {oc: 0, ic: 0, di: a - 1, dj: c - 1}, accesses) for c in range(3)]
                for a in range(3)]
    return _differences(t, x, gy, expected)


def _row(direction: str, t: WinogradTransforms, differences: list, what: str) -> Row:
    points = ", ".join(str(p) for p in t.points) + ", ∞"
    if differences:
        i, j, poly = differences[0]
        verdict, detail = "fail", f"{len(differences)} entries differ, ({i},{j}): {poly}"
    else:
        verdict, detail = "pass", f"equals {what} (points {points})"
    return Row("Convolution2D", direction, None, f"winograd {t.name}; exact", verdict, detail)


def winograd_rows(sizes=ALGORITHMS) -> list[Row]:
    """One row per algorithm and direction, for `vggen check`."""
    rows = []
    for m in sizes:
        t = forward_transforms(m)
        rows.append(_row("forward", t, prove_forward(t), "eq. 1 on a tile"))
        rows.append(_row("∂L/∂x", t, prove_input_gradient(t), "derived g_x, w flipped, edge tiles"))
        tw = weight_gradient_transforms(m)
        rows.append(_row("∂L/∂w", tw, prove_weight_gradient(tw), f"derived g_w over a {m}×{m} g_y tile"))
    return rows


__all__ = ["ALGORITHMS", "tile_product", "prove_forward", "prove_input_gradient", "prove_weight_gradient",
           "winograd_rows"]
