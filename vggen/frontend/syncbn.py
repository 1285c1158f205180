"""BatchNormalization over the global batch of several ranks (``--sync-bn``),
written as equations split where a rank's data ends.

Eqs. 19–20 sum over the batch; with the batch sharded over R ranks each sum
is a sum of per-rank partial sums.  A rank runs, over its own shard of B
samples (N = R·B·H·W elements per channel in all, the tensor ``count``):

1. ``BatchNormalizationPartialSum``: s_r(c) = Σ_{b,i,j} x(b,c,i,j); allreduce;
   ``BatchNormalizationMean``: μ(c) = Σ_r s_r(c) / N            (eq. 19)
2. ``BatchNormalizationPartialSquares``: q_r(c) = Σ (x − μ)²; allreduce;
   ``BatchNormalizationVariance``: σ²(c) = Σ_r q_r(c) / N        (eq. 20)
3. ``BatchNormalizationNormalise``: x̂ and y from the global μ, σ² (eqs. 21–22).
   Its derived backward gives the partial ∂L/∂γ = Σ g_y x̂ and ∂L/∂β = Σ g_y
   over the shard (eqs. 24–25); allreduce (one message, both vectors);
4. ``BatchNormalizationInputGradient``: eq. 50 with the global ∂L/∂γ, ∂L/∂β
   and the global N.

Why two allreduces in the forward rather than one of (Σx, Σx²): σ² = Σx²/N − μ²
cancels catastrophically in float32 when |μ| ≫ σ (activations after a ReLU
are all positive), while Σ(x − μ)² with the global μ is eq. 20 itself, summed
in pieces, so it rounds as one process does.  The second message is C floats;
next to a convolution its latency is nothing.

``vggen check`` proves the composition over R shards equal to eqs. 19, 20,
24, 25 and 50 over the global batch (vggen/proof/syncbn.py).
"""

from __future__ import annotations

import sympy as sp

from vggen.frontend.lang import Equation, Layer, Role, Sum, Tensor
from vggen.frontend.layers import BN_EPSILON, EPS, B, C, H, W, b, c, i, j

_SHARD = ((b, 0, B), (i, 0, H), (j, 0, W))


def _count() -> Tensor:
    # the global element count per channel, N = R·B·H·W: a tensor, since R is no size of this rank's tensors
    return Tensor("count", (1,), Role.INPUT, differentiable=False, doc="N = R·B·H·W")


def partial_sum() -> Layer:
    x = Tensor("x", (B, C, H, W), Role.INPUT, differentiable=False)
    s = Tensor("s", (C,), Role.OUTPUT, doc="Σx over the rank's shard")
    return Layer("BatchNormalizationPartialSum", [x, s],
                 [Equation(s[c], Sum(x[b, c, i, j], *_SHARD), "eq. 19, one rank's part")])


def mean() -> Layer:
    s = Tensor("s", (C,), Role.INPUT, differentiable=False, doc="Σx over every rank")
    count = _count()
    mu = Tensor("mu", (C,), Role.OUTPUT)
    return Layer("BatchNormalizationMean", [s, count, mu], [Equation(mu[c], s[c] / count[0], "eq. 19")])


def partial_squares() -> Layer:
    x = Tensor("x", (B, C, H, W), Role.INPUT, differentiable=False)
    mu = Tensor("mu", (C,), Role.INPUT, differentiable=False, doc="the global μ")
    q = Tensor("q", (C,), Role.OUTPUT, doc="Σ(x − μ)² over the rank's shard")
    return Layer("BatchNormalizationPartialSquares", [x, mu, q],
                 [Equation(q[c], Sum((x[b, c, i, j] - mu[c]) ** 2, *_SHARD), "eq. 20, one rank's part")])


def variance() -> Layer:
    q = Tensor("q", (C,), Role.INPUT, differentiable=False, doc="Σ(x − μ)² over every rank")
    count = _count()
    var = Tensor("var", (C,), Role.OUTPUT, doc="σ²")
    return Layer("BatchNormalizationVariance", [q, count, var], [Equation(var[c], q[c] / count[0], "eq. 20")])


def normalise() -> Layer:
    """Eqs. 21–22 with μ and σ² given: the gradient does not flow through the
    statistics here (step 4 puts that term back with the global sums), so the
    derived backward is the partial ∂L/∂γ, ∂L/∂β of the shard."""
    x = Tensor("x", (B, C, H, W), Role.INPUT)
    gamma = Tensor("gamma", (C,), Role.PARAMETER)
    beta = Tensor("beta", (C,), Role.PARAMETER)
    mu = Tensor("mu", (C,), Role.INPUT, differentiable=False)
    var = Tensor("var", (C,), Role.INPUT, differentiable=False, doc="σ²")
    xhat = Tensor("xhat", (B, C, H, W), Role.SAVED)
    y = Tensor("y", (B, C, H, W), Role.OUTPUT)
    return Layer("BatchNormalizationNormalise", [x, gamma, beta, mu, var, xhat, y], [
        Equation(xhat[b, c, i, j], (x[b, c, i, j] - mu[c]) / sp.sqrt(var[c] + EPS), "eq. 21"),
        Equation(y[b, c, i, j], gamma[c] * xhat[b, c, i, j] + beta[c], "eq. 22"),
    ], constants={EPS: BN_EPSILON})


def input_gradient() -> Layer:
    """Eq. 50 over the global batch: a forward-style layer whose output is ∂L/∂x."""
    g_y = Tensor("g_y", (B, C, H, W), Role.INPUT, differentiable=False)
    xhat = Tensor("xhat", (B, C, H, W), Role.INPUT, differentiable=False)
    gamma = Tensor("gamma", (C,), Role.INPUT, differentiable=False)
    var = Tensor("var", (C,), Role.INPUT, differentiable=False, doc="σ²")
    g_gamma = Tensor("g_gamma", (C,), Role.INPUT, differentiable=False, doc="global ∂L/∂γ")
    g_beta = Tensor("g_beta", (C,), Role.INPUT, differentiable=False, doc="global ∂L/∂β")
    count = _count()
    g_x = Tensor("g_x", (B, C, H, W), Role.OUTPUT)
    rhs = gamma[c] / sp.sqrt(var[c] + EPS) * (
        g_y[b, c, i, j] - (g_gamma[c] * xhat[b, c, i, j] + g_beta[c]) / count[0])
    return Layer("BatchNormalizationInputGradient", [g_y, xhat, gamma, var, g_gamma, g_beta, count, g_x],
                 [Equation(g_x[b, c, i, j], rhs, "eq. 50")], constants={EPS: BN_EPSILON})


def sync_batch_normalization_layers() -> list[Layer]:
    """Every stage, in the order a rank runs them."""
    return [partial_sum(), mean(), partial_squares(), variance(), normalise(), input_gradient()]


__all__ = ["partial_sum", "mean", "partial_squares", "variance", "normalise", "input_gradient",
           "sync_batch_normalization_layers"]
