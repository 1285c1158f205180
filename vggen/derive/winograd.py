"""Winograd minimal filtering F(m×m, r×r): the transforms Aᵀ, G, Bᵀ built by
Toom–Cook from chosen interpolation points, in exact rationals.

A 1-D correlation of a length-n = m + r − 1 input d with a length-r filter g,
y_i = Σ_k g_k d_{i+k} (i < m), is the transpose (in the data) of the linear
convolution of g with a length-m sequence.  Toom–Cook computes that convolution
by evaluating both polynomials at n points (n − 1 finite ones and ∞, where a
polynomial's "value" is its leading coefficient), multiplying pointwise, and
interpolating:  s = V_n⁻¹ [(V_r g) ⊙ (V_m h)], with V_k the n×k evaluation
matrix.  Transposing in h gives the correlation

    y = Aᵀ [(G g) ⊙ (Bᵀ d)],   Aᵀ = V_mᵀ,  G = V_r,  Bᵀ = V_n⁻ᵀ,

and in 2-D, with one tile at a time, Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A.  A row j of
Bᵀ may be divided by any s_j if row j of G is multiplied by it: each row of Bᵀ is
scaled to coprime integers (so the data transform, run once per tile and
channel, multiplies by small integers only) and G takes the factor (it runs once
per filter).

Points (:data:`POINTS`): 0, ±1 for m = 2, then ½ and −2 for m = 4.  Small points
keep the Vandermonde matrices' entries (powers up to n − 1) near 1; a point and
its reciprocal together balance the growth of Bᵀ's entries against G's.  The
float32 error of each choice, max |y₃₂ − y₆₄| / max |y₆₄| with y₆₄ the float64
direct convolution, measured by ``python -m vggen.runtime.winograd`` (numpy,
float32 throughout) on the network's 3×3 convolutions at --width 64 (B = 8,
uniform ±1 data, Kaiming-scaled filters; worst over the five layer shapes
32×32×64 … 2×2×512):

    ====================  ==================  =========  =========  =========
    algorithm             points              forward    ∂L/∂x      ∂L/∂w
    ====================  ==================  =========  =========  =========
    direct, float32       —                   3.5e-07    4.2e-07    5.2e-07
    F(2×2, 3×3)           0, ±1, ∞            7.0e-07    6.5e-07    7.5e-07
    F(4×4, 3×3)           0, ±1, ½, −2, ∞     4.6e-06    4.5e-06    2.9e-06
    F(4×4, 3×3)           0, ±1, ±2, ∞        1.3e-05    1.6e-05    8.5e-06
    ====================  ==================  =========  =========  =========

F(2×2) costs 2× the direct error; F(4×4) with ½, −2 about 10×, and 2.5–3× less
than Lavin and Gray's 0, ±1, ±2 (:data:`POINTS_INTEGER_4`), which is why it is
the default.  ∂L/∂w uses F(3×3, m×m) on the same points.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

R = sp.Rational

# Finite interpolation points per output tile size m for r = 3 (n − 1 = m + 1 of
# them; ∞ is always the last point).  F(3×3, m×m), the weight gradient's form,
# has the same n = m + 2 and uses the same points.
POINTS: dict[int, tuple] = {
    2: (0, 1, -1),
    4: (0, 1, -1, R(1, 2), -2),
}
# The float32 error a test holds each tile size to, max |y₃₂ − y₆₄| / max |y₆₄|: the
# worst measured in the table above, with a margin of about 2.
FLOAT32_BOUND: dict[int, float] = {2: 2e-6, 4: 1e-5}
# Lavin and Gray's F(4×4, 3×3) points, kept for the error comparison.
POINTS_INTEGER_4 = (0, 1, -1, 2, -2)


@dataclass(frozen=True)
class WinogradTransforms:
    """Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A for an n×n data tile d and r×r filter g."""
    m: int               # output tile size
    r: int               # filter size
    points: tuple        # the finite interpolation points (∞ is implied, last)
    AT: sp.Matrix        # m × n, inverse (output) transform
    G: sp.Matrix         # n × r, filter transform
    BT: sp.Matrix        # n × n, data transform

    @property
    def n(self) -> int:
        return self.m + self.r - 1

    @property
    def name(self) -> str:
        return f"F({self.m}×{self.m}, {self.r}×{self.r})"

    def replace(self, **matrices) -> "WinogradTransforms":
        """A copy with some matrices replaced (a test's mutation)."""
        fields = dict(m=self.m, r=self.r, points=self.points, AT=self.AT, G=self.G, BT=self.BT)
        fields.update(matrices)
        return WinogradTransforms(**fields)


def evaluation_matrix(points, n: int, k: int) -> sp.Matrix:
    """n × k: row j evaluates a polynomial with k coefficients (ascending) at
    ``points[j]``; the last row, at ∞, takes its leading coefficient."""
    assert len(points) == n - 1
    rows = [[sp.nsimplify(p) ** e for e in range(k)] for p in points]
    rows.append([0] * (k - 1) + [1])
    return sp.Matrix(rows)


def _primitive_row_scale(row) -> sp.Rational:
    """The positive rational s with row / s coprime integers (sign: first nonzero > 0)."""
    nonzero = [sp.Rational(v) for v in row if v != 0]
    num = sp.igcd(*[v.p for v in nonzero]) if len(nonzero) > 1 else abs(nonzero[0].p)
    den = sp.ilcm(*[v.q for v in nonzero]) if len(nonzero) > 1 else nonzero[0].q
    scale = sp.Rational(num, den)
    return scale if nonzero[0] > 0 else -scale


def toom_cook(m: int, r: int, points=None) -> WinogradTransforms:
    """Aᵀ, G, Bᵀ of F(m, r) from ``points`` (default :data:`POINTS`), exact."""
    n = m + r - 1
    points = tuple(sp.nsimplify(p) for p in (POINTS[m if r == 3 else r] if points is None else points))
    if len(points) != n - 1 or len(set(points)) != n - 1:
        raise ValueError(f"F({m}, {r}) needs {n - 1} distinct finite points, got {points}")
    AT = evaluation_matrix(points, n, m).T
    G = evaluation_matrix(points, n, r)
    BT = evaluation_matrix(points, n, n).inv().T
    for j in range(n):
        s = _primitive_row_scale(BT.row(j))
        BT[j, :] = BT.row(j) / s
        G[j, :] = G.row(j) * s
    return WinogradTransforms(m, r, points, AT, G, BT)


@lru_cache(maxsize=None)
def forward_transforms(m: int) -> WinogradTransforms:
    """F(m×m, 3×3): the forward and ∂L/∂x (a 3×3 correlation with the flipped filter)."""
    return toom_cook(m, 3)


@lru_cache(maxsize=None)
def weight_gradient_transforms(m: int) -> WinogradTransforms:
    """F(3×3, m×m): ∂L/∂w per m×m tile of ∂L/∂y, whose (m+2)×(m+2) input tile is x's."""
    return toom_cook(3, m, POINTS[m])


__all__ = ["POINTS", "POINTS_INTEGER_4", "FLOAT32_BOUND", "WinogradTransforms", "evaluation_matrix", "toom_cook",
           "forward_transforms", "weight_gradient_transforms"]
