"""The document's backward equations, transcribed as written ("Math for VGG").

These are what vggen's own derivations are checked against; nothing here is
used to produce a kernel.  Each entry names the layer, the gradient it gives
and the equation number; ``expr`` is the right-hand side in the index names
of the left-hand side ``lhs``.  Eq. 4 is the scatter form: the sum runs over
every (i, j, i′, j′) and a Kronecker delta picks those that land on (i″, j″).
Eq. 55 stops at the chain rule in the document; its completion (the gradient
goes to the window's first maximum, which the forward saved) is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from vggen.frontend.lang import Sum, indices, iverson
from vggen.frontend.layers import EPS, OC, B, C, H, K, S, W

b, c, ic, oc, i, j, di, dj, i2, j2 = indices("b c ic oc i j di dj i2 j2")


def _t(name):
    return sp.IndexedBase(name)


x, w, R, xhat, gamma, var, sel = map(_t, ["x", "w", "R", "xhat", "gamma", "var", "sel"])
g_x, g_y, g_w, g_gamma, g_beta = map(_t, ["g_x", "g_y", "g_w", "g_gamma", "g_beta"])


@dataclass(frozen=True)
class DocEquation:
    number: str          # "8", "55 (completed)"
    layer: str           # the Layer's name
    gradient: str        # the gradient tensor, e.g. "g_x"
    lhs: sp.Indexed
    expr: sp.Expr
    note: str = ""


def document_equations() -> list[DocEquation]:
    n = B * H * W
    return [
        DocEquation("4", "Convolution2D", "g_x", g_x[b, ic, i2, j2],
                    Sum(g_y[b, oc, i, j] * w[oc, ic, di, dj]
                        * sp.KroneckerDelta(i2, i + di) * sp.KroneckerDelta(j2, j + dj),
                        (oc, 0, OC), (i, 0, H), (j, 0, W), (di, -K, K + 1), (dj, -K, K + 1)),
                    "scatter form"),
        DocEquation("8", "Convolution2D", "g_x", g_x[b, ic, i, j],
                    Sum(iverson(sp.And(i - H < di, di <= i, j - W < dj, dj <= j))
                        * g_y[b, oc, i - di, j - dj] * w[oc, ic, di, dj],
                        (oc, 0, OC), (di, -K, K + 1), (dj, -K, K + 1)),
                    "gather form"),
        DocEquation("11", "Convolution2D", "g_w", g_w[oc, ic, di, dj],
                    Sum(g_y[b, oc, i, j] * x[b, ic, i + di, j + dj], (b, 0, B), (i, 0, H), (j, 0, W))),
        DocEquation("14", "Linear", "g_x", g_x[b, ic], Sum(g_y[b, c] * w[ic, c], (c, 0, C))),
        DocEquation("16", "Linear", "g_w", g_w[ic, c], Sum(g_y[b, c] * x[b, ic], (b, 0, B))),
        DocEquation("18", "Dropout", "g_x", g_x[b, c, i, j], g_y[b, c, i, j] * R[b, c, i, j]),
        DocEquation("24", "BatchNormalization", "g_gamma", g_gamma[c],
                    Sum(g_y[b, c, i, j] * xhat[b, c, i, j], (b, 0, B), (i, 0, H), (j, 0, W))),
        DocEquation("25", "BatchNormalization", "g_beta", g_beta[c],
                    Sum(g_y[b, c, i, j], (b, 0, B), (i, 0, H), (j, 0, W))),
        DocEquation("50", "BatchNormalization", "g_x", g_x[b, c, i, j],
                    gamma[c] / sp.sqrt(var[c] + EPS)
                    * (g_y[b, c, i, j] - (g_gamma[c] * xhat[b, c, i, j] + g_beta[c]) / n)),
        DocEquation("53", "ReLU", "g_x", g_x[b, c, i, j],
                    sp.Piecewise((g_y[b, c, i, j], x[b, c, i, j] >= 0), (0, True))),
        DocEquation("55", "MaxPooling2D", "g_x", g_x[b, c, i, j],
                    g_y[b, c, sp.floor(i / S), sp.floor(j / S)]
                    * sp.KroneckerDelta(sel[b, c, sp.floor(i / S), sp.floor(j / S)],
                                        S * sp.Mod(i, S) + sp.Mod(j, S)),
                    "completed: the first maximum of the window (row-major) gets the gradient"),
    ]
