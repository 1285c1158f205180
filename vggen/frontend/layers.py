"""The forward equations of VGG's layers, each written once.

Numbers refer to "Math for VGG" (see equations.md).  Sizes are symbols, so a
derivation made here holds for every size; the kernel generator substitutes
the concrete window sizes (K, S) it specialises for.
"""

from __future__ import annotations

import sympy as sp

from vggen.frontend.lang import (
    Argmax,
    Equation,
    Layer,
    Max,
    Role,
    Sum,
    Tensor,
    chain,
    indices,
    iverson,
    sizes,
)

B, C, IC, OC, H, W, HO, WO = sizes("B C IC OC H W HO WO")
K, S = sizes("K S")
EPS = sp.Symbol("epsilon", positive=True)
BN_EPSILON = 2e-5          # ε of BatchNormalization (Chainer's default, the reference's)
b, c, ic, oc, i, j, di, dj, p, q = indices("b c ic oc i j di dj p q")


def convolution2d(k=K) -> Layer:
    """(1) y(b,oc,i,j) = Σ_{ic, −K≤i′,j′≤K} w(oc,ic,i′,j′) x(b,ic,i+i′,j+j′), zero padding."""
    x = Tensor("x", (B, IC, H, W), Role.INPUT, zero_outside=True)
    w = Tensor("w", (OC, IC, 2 * k + 1, 2 * k + 1), Role.PARAMETER, lower=(0, 0, -k, -k))
    y = Tensor("y", (B, OC, H, W), Role.OUTPUT)
    fwd = Equation(y[b, oc, i, j],
                   Sum(w[oc, ic, di, dj] * x[b, ic, i + di, j + dj],
                       (ic, 0, IC), (di, -k, k + 1), (dj, -k, k + 1)), "eq. 1")
    return Layer("Convolution2D" if k == K else f"Convolution2D(K={k})", [x, w, y], [fwd])


def linear() -> Layer:
    """(12) y(b,c) = Σ_ic x(b,ic) w(ic,c)  (the document's trailing 0, 0 indices dropped)."""
    x = Tensor("x", (B, IC), Role.INPUT)
    w = Tensor("w", (IC, C), Role.PARAMETER)
    y = Tensor("y", (B, C), Role.OUTPUT)
    return Layer("Linear", [x, w, y], [Equation(y[b, c], Sum(x[b, ic] * w[ic, c], (ic, 0, IC)), "eq. 12")])


def dropout() -> Layer:
    """(17) y = R x, R(b,c,i,j) ∈ {0, 1/(1−p)} drawn by the caller."""
    x = Tensor("x", (B, C, H, W), Role.INPUT)
    r = Tensor("R", (B, C, H, W), Role.INPUT, differentiable=False, doc="dropout mask")
    y = Tensor("y", (B, C, H, W), Role.OUTPUT)
    return Layer("Dropout", [x, r, y], [Equation(y[b, c, i, j], r[b, c, i, j] * x[b, c, i, j], "eq. 17")])


def batch_normalization() -> Layer:
    """(19)–(22): batch statistics per channel, normalise, scale and shift."""
    x = Tensor("x", (B, C, H, W), Role.INPUT)
    gamma = Tensor("gamma", (C,), Role.PARAMETER)
    beta = Tensor("beta", (C,), Role.PARAMETER)
    mu = Tensor("mu", (C,), Role.SAVED)
    var = Tensor("var", (C,), Role.SAVED, doc="σ²")
    xhat = Tensor("xhat", (B, C, H, W), Role.SAVED)
    y = Tensor("y", (B, C, H, W), Role.OUTPUT)
    n = B * H * W
    batch = ((b, 0, B), (i, 0, H), (j, 0, W))
    eqs = [
        Equation(mu[c], Sum(x[b, c, i, j], *batch) / n, "eq. 19"),
        Equation(var[c], Sum((x[b, c, i, j] - mu[c]) ** 2, *batch) / n, "eq. 20"),
        Equation(xhat[b, c, i, j], (x[b, c, i, j] - mu[c]) / sp.sqrt(var[c] + EPS), "eq. 21"),
        Equation(y[b, c, i, j], gamma[c] * xhat[b, c, i, j] + beta[c], "eq. 22"),
    ]
    return Layer("BatchNormalization", [x, gamma, beta, mu, var, xhat, y], eqs,
                 constants={EPS: BN_EPSILON})


def batch_normalization_running() -> Layer:
    """The running statistics evaluation uses, updated in place after each
    training step: r_μ ← m r_μ + (1 − m) μ, r_σ² ← m r_σ² + (1 − m) n/(n − 1) σ²
    (n = BHW: the variance made unbiased, as Chainer and PyTorch do).  The
    weights are the tensor ``k = (m, 1 − m, (1 − m) n/(n − 1))``, fixed per
    layer and batch size (n is not a size of these tensors)."""
    mu = Tensor("mu", (C,), Role.INPUT, differentiable=False)
    var = Tensor("var", (C,), Role.INPUT, differentiable=False, doc="σ²")
    k = Tensor("k", (3,), Role.INPUT, differentiable=False, doc="m, 1 − m, (1 − m) n/(n − 1)")
    running_mean = Tensor("running_mean", (C,), Role.STATE)
    running_var = Tensor("running_var", (C,), Role.STATE)
    return Layer("RunningStatistics", [mu, var, k, running_mean, running_var], [
        Equation(running_mean[c], k[0] * running_mean[c] + k[1] * mu[c], "running mean"),
        Equation(running_var[c], k[0] * running_var[c] + k[2] * var[c], "running variance"),
    ])


def elementwise_activation(name: str, f, label: str = "") -> Layer:
    """y = f(x) elementwise; ``f`` maps a SymPy expression to one."""
    x = Tensor("x", (B, C, H, W), Role.INPUT)
    y = Tensor("y", (B, C, H, W), Role.OUTPUT)
    return Layer(name, [x, y], [Equation(y[b, c, i, j], f(x[b, c, i, j]), label)])


def relu() -> Layer:
    """(51)–(52) y = x where x ≥ 0, else 0 (so the gradient passes at x = 0, eq. 53)."""
    return elementwise_activation("ReLU", lambda v: sp.Piecewise((v, v >= 0), (0, True)), "eq. 51")


def max_pooling2d(s=S) -> Layer:
    """(54) y(b,c,i,j) = max over the S×S window at (S i, S j).

    Written as two equations: the forward selects the window position of the
    first maximum (row-major), then y reads the selected element.  The
    selection is piecewise constant, so it carries no gradient, and the
    backward of the second equation sends each gradient to that one element
    (completing eq. 55).
    """
    x = Tensor("x", (B, C, s * HO, s * WO), Role.INPUT)
    sel = Tensor("sel", (B, C, HO, WO), Role.SAVED, dtype="int", doc="window position of the first maximum")
    y = Tensor("y", (B, C, HO, WO), Role.OUTPUT)
    window = ((p, 0, s), (q, 0, s))
    eqs = [
        Equation(sel[b, c, i, j], Argmax(x[b, c, s * i + p, s * j + q], *window), "eq. 54"),
        Equation(y[b, c, i, j], Sum(sp.KroneckerDelta(sel[b, c, i, j], s * p + q)
                                    * x[b, c, s * i + p, s * j + q], *window), "eq. 54"),
    ]
    return Layer("MaxPooling2D" if s == S else f"MaxPooling2D(S={s})", [x, sel, y], eqs)


def softmax_cross_entropy() -> Layer:
    """L(b) = log Σ_c exp(x(b,c)) − x(b, t(b)), shifted by the row maximum m(b).

    L does not depend on m (the shift cancels), so m carries no gradient; it
    keeps exp from overflowing.  Not in the document.
    """
    x = Tensor("x", (B, C), Role.INPUT)
    t = Tensor("t", (B,), Role.INPUT, dtype="int", doc="labels")
    m = Tensor("m", (B,), Role.SAVED, differentiable=False, doc="row maximum")
    s = Tensor("s", (B,), Role.SAVED, doc="Σ_c exp(x − m)")
    loss = Tensor("L", (B,), Role.OUTPUT)
    eqs = [
        Equation(m[b], Max(x[b, c], (c, 0, C)), ""),
        Equation(s[b], Sum(sp.exp(x[b, c] - m[b]), (c, 0, C)), ""),
        Equation(loss[b], sp.log(s[b]) + m[b] - Sum(sp.KroneckerDelta(c, t[b]) * x[b, c], (c, 0, C)), ""),
    ]
    return Layer("SoftmaxCrossEntropy", [x, t, m, s, loss], eqs)


def vgg_layers() -> list[Layer]:
    """The seven layer kinds of the VGG network, in the document's order."""
    return [convolution2d(), linear(), dropout(), batch_normalization(), relu(),
            max_pooling2d(), softmax_cross_entropy()]


def batch_normalization_relu() -> Layer:
    """BatchNormalization → ReLU as one layer (the network's block without dropout)."""
    return chain("BatchNormalization+ReLU", batch_normalization(), relu())


def batch_normalization_relu_dropout() -> Layer:
    """BatchNormalization → ReLU → Dropout as one layer."""
    return chain("BatchNormalization+ReLU+Dropout", batch_normalization(), relu(), dropout())


def fused_layers() -> list[Layer]:
    """The compositions the network runs as single layers (``chain``)."""
    return [batch_normalization_relu(), batch_normalization_relu_dropout()]


def network_layers() -> list[Layer]:
    """Every layer the network's kernels are generated for."""
    return vgg_layers() + fused_layers()


__all__ = ["convolution2d", "linear", "dropout", "batch_normalization", "relu",
           "max_pooling2d", "softmax_cross_entropy", "vgg_layers", "batch_normalization_relu",
           "batch_normalization_relu_dropout", "fused_layers", "network_layers",
           "batch_normalization_running", "elementwise_activation",
           "iverson"]
