"""A zoo of layers outside VGG, each written once through the public front end.

Every layer here is equations only (:mod:`vggen.frontend.lang`, the function
table of :mod:`vggen.frontend.functions`, ``elementwise_activation``):
``derive`` gives its backward, ``vggen.compile`` its C, CUDA and NumPy ops,
and ``vggen check --layers zoo`` derives each one.  ``ZOO`` names them, with
the sizes each needs fixed at compile time and the PyTorch expression it
equals (a string: vggen does not import torch).  ``tests/zoo/test_zoo.py``
checks every entry against PyTorch, on every target.

Shapes are chosen so that the inputs' shapes tell every size: a strided
layer's input is just wide enough for its HO × WO outputs (for a 3×3,
stride 2, padding 1 convolution an odd H = 2·HO − 1, whose output PyTorch
gives as HO too).  Only a number of groups that no input shape shows is a
compile-time size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import sympy as sp

from vggen.frontend.functions import sigmoid as _sigmoid
from vggen.frontend.functions import softplus as _softplus
from vggen.frontend.lang import Argmax, Equation, Layer, Role, Sum, Tensor, indices, sizes
from vggen.frontend.layers import EPS, HO, OC, WO, B, C, H, W, elementwise_activation

G, CG, OG = sizes("G CG OG")          # groups, channels per group in and out
NORM_EPSILON = 1e-5                    # PyTorch's default for LayerNorm and GroupNorm
LEAKY_SLOPE = sp.Rational(1, 10)
b, c, o, g, i, j, p, q, di, dj, n = indices("b c o g i j p q di dj n")


# --------------------------------------------------------------------------- convolutions


def convolution(k: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> Layer:
    """y(b,o,i,j) = Σ_{c,p,q} w(o,c,p,q)·x(b,c, s·i + d·p − pad, s·j + d·q − pad), x just wide enough."""
    def extent(out):             # the smallest input extent that gives ``out`` outputs
        return stride * (out - 1) + dilation * (k - 1) + 1 - 2 * padding

    same = sp.expand(extent(HO)) == HO          # a "same" convolution: one plane size, H × W
    rows, cols = (H, W) if same else (HO, WO)
    x = Tensor("x", (B, C, sp.expand(extent(rows)), sp.expand(extent(cols))), Role.INPUT,
               zero_outside=padding > 0)
    w = Tensor("w", (OC, C, k, k), Role.PARAMETER)
    y = Tensor("y", (B, OC, rows, cols), Role.OUTPUT)
    read = x[b, c, stride * i + dilation * p - padding, stride * j + dilation * q - padding]
    name = f"Conv{k}x{k}" + (f"S{stride}" if stride != 1 else "") + (f"P{padding}" if padding else "") \
        + (f"D{dilation}" if dilation != 1 else "")
    window = ((c, 0, C), (p, 0, k), (q, 0, k))
    return Layer(name, [x, w, y], [Equation(y[b, o, i, j], Sum(w[o, c, p, q] * read, *window))])


def convolution3x3_stride2() -> Layer:
    """3×3 convolution, stride 2, padding 1 (x is 2·HO − 1 by 2·WO − 1)."""
    return convolution(3, stride=2, padding=1)


def convolution5x5_stride2() -> Layer:
    """5×5 convolution, stride 2, padding 2 (x is 2·HO − 1 by 2·WO − 1)."""
    return convolution(5, stride=2, padding=2)


def convolution2x2_stride2() -> Layer:
    """2×2 convolution, stride 2, no padding (x is 2·HO by 2·WO)."""
    return convolution(2, stride=2)


def dilated_convolution3x3() -> Layer:
    """3×3 convolution, dilation 2, padding 2: a 5×5 reach, the output as large as the input."""
    return convolution(3, padding=2, dilation=2)


def depthwise_convolution3x3() -> Layer:
    """y(b,c,i,j) = Σ_{i′,j′} w(c,i′,j′)·x(b,c,i+i′,j+j′), −1 ≤ i′,j′ ≤ 1: a 3×3 filter per channel."""
    x = Tensor("x", (B, C, H, W), Role.INPUT, zero_outside=True)
    w = Tensor("w", (C, 3, 3), Role.PARAMETER, lower=(0, -1, -1))
    y = Tensor("y", (B, C, H, W), Role.OUTPUT)
    return Layer("DepthwiseConv3x3", [x, w, y], [
        Equation(y[b, c, i, j], Sum(w[c, di, dj] * x[b, c, i + di, j + dj], (di, -1, 2), (dj, -1, 2)))])


def grouped_convolution3x3() -> Layer:
    """G groups of a 3×3 convolution (padding 1): output channel o reads the CG input channels of group ⌊o/OG⌋."""
    x = Tensor("x", (B, G * CG, H, W), Role.INPUT, zero_outside=True)
    w = Tensor("w", (G * OG, CG, 3, 3), Role.PARAMETER, lower=(0, 0, -1, -1))
    y = Tensor("y", (B, G * OG, H, W), Role.OUTPUT)
    read = x[b, CG * sp.floor(o / OG) + c, i + di, j + dj]
    return Layer("GroupedConv3x3", [x, w, y], [
        Equation(y[b, o, i, j], Sum(w[o, c, di, dj] * read, (c, 0, CG), (di, -1, 2), (dj, -1, 2)))])


# --------------------------------------------------------------------------- pooling


def average_pooling2x2() -> Layer:
    """y(b,c,i,j) = ¼ Σ_{p,q<2} x(b,c,2i+p,2j+q)."""
    x = Tensor("x", (B, C, 2 * HO, 2 * WO), Role.INPUT)
    y = Tensor("y", (B, C, HO, WO), Role.OUTPUT)
    return Layer("AveragePooling2D", [x, y], [
        Equation(y[b, c, i, j], Sum(x[b, c, 2 * i + p, 2 * j + q], (p, 0, 2), (q, 0, 2)) / 4)])


def global_average_pooling() -> Layer:
    """y(b,c) = Σ_{i,j} x(b,c,i,j) / (HW)."""
    x = Tensor("x", (B, C, H, W), Role.INPUT)
    y = Tensor("y", (B, C), Role.OUTPUT)
    return Layer("GlobalAveragePooling", [x, y], [
        Equation(y[b, c], Sum(x[b, c, i, j], (i, 0, H), (j, 0, W)) / (H * W))])


def max_pooling(k: int = 3, stride: int = 2) -> Layer:
    """Max over the k×k window every ``stride`` positions (the first maximum's position saved), x just wide enough."""
    x = Tensor("x", (B, C, stride * (HO - 1) + k, stride * (WO - 1) + k), Role.INPUT)
    sel = Tensor("sel", (B, C, HO, WO), Role.SAVED, dtype="int", doc="window position of the first maximum")
    y = Tensor("y", (B, C, HO, WO), Role.OUTPUT)
    window = ((p, 0, k), (q, 0, k))
    read = x[b, c, stride * i + p, stride * j + q]
    return Layer(f"MaxPool{k}x{k}S{stride}", [x, sel, y], [
        Equation(sel[b, c, i, j], Argmax(read, *window)),
        Equation(y[b, c, i, j], Sum(sp.KroneckerDelta(sel[b, c, i, j], k * p + q) * read, *window)),
    ])


def max_pooling3x3_stride2() -> Layer:
    """3×3 max pooling, stride 2 (x is 2·HO + 1 by 2·WO + 1)."""
    return max_pooling(3, 2)


def nearest_upsampling(s: int = 2) -> Layer:
    """y(b,c,i,j) = x(b,c,⌊i/s⌋,⌊j/s⌋): nearest-neighbour upsampling by s."""
    x = Tensor("x", (B, C, H, W), Role.INPUT)
    y = Tensor("y", (B, C, s * H, s * W), Role.OUTPUT)
    return Layer(f"Upsample{s}", [x, y], [Equation(y[b, c, i, j], x[b, c, sp.floor(i / s), sp.floor(j / s)])])


# --------------------------------------------------------------------------- activations


def tanh() -> Layer:
    """y = tanh(x)."""
    return elementwise_activation("Tanh", sp.tanh)


def sigmoid() -> Layer:
    """y = σ(x) = 1/(1 + e^−x), the table's σ."""
    return elementwise_activation("Sigmoid", _sigmoid)


def silu() -> Layer:
    """y = x/(1 + e^−x) (swish, SiLU), written with exp: the derivation finds σ in it."""
    return elementwise_activation("SiLU", lambda v: v / (1 + sp.exp(-v)))


def gelu() -> Layer:
    """y = x·(1 + erf(x/√2))/2 (exact GELU)."""
    return elementwise_activation("GELU", lambda v: v * (1 + sp.erf(v / sp.sqrt(2))) / 2)


def softplus() -> Layer:
    """y = log(1 + e^x), the table's softplus."""
    return elementwise_activation("Softplus", _softplus)


def elu() -> Layer:
    """y = x for x > 0, else e^x − 1 (α = 1)."""
    return elementwise_activation("ELU", lambda v: sp.Piecewise((v, v > 0), (sp.exp(v) - 1, True)))


def leaky_relu(slope=LEAKY_SLOPE) -> Layer:
    """y = x for x ≥ 0, else slope·x (slope 1/10)."""
    return elementwise_activation("LeakyReLU", lambda v: sp.Piecewise((v, v >= 0), (slope * v, True)))


# --------------------------------------------------------------------------- normalisation


def sample_normalization() -> Layer:
    """Statistics per sample over (c,i,j), then γ, β per channel (LayerNorm over C, H, W; GroupNorm with 1 group)."""
    x = Tensor("x", (B, C, H, W), Role.INPUT)
    gamma = Tensor("gamma", (C,), Role.PARAMETER)
    beta = Tensor("beta", (C,), Role.PARAMETER)
    mu = Tensor("mu", (B,), Role.SAVED)
    var = Tensor("var", (B,), Role.SAVED, doc="σ²")
    y = Tensor("y", (B, C, H, W), Role.OUTPUT)
    sample = ((c, 0, C), (i, 0, H), (j, 0, W))
    n_ = C * H * W
    return Layer("SampleNormalization", [x, gamma, beta, mu, var, y], [
        Equation(mu[b], Sum(x[b, c, i, j], *sample) / n_),
        Equation(var[b], Sum((x[b, c, i, j] - mu[b]) ** 2, *sample) / n_),
        Equation(y[b, c, i, j], gamma[c] * (x[b, c, i, j] - mu[b]) / sp.sqrt(var[b] + EPS) + beta[c]),
    ], constants={EPS: NORM_EPSILON})


def group_normalization() -> Layer:
    """Statistics per sample and group of CG channels over (c,i,j), then γ, β per channel (GroupNorm, G groups)."""
    x = Tensor("x", (B, G * CG, H, W), Role.INPUT)
    gamma = Tensor("gamma", (G * CG,), Role.PARAMETER)
    beta = Tensor("beta", (G * CG,), Role.PARAMETER)
    mu = Tensor("mu", (B, G), Role.SAVED)
    var = Tensor("var", (B, G), Role.SAVED, doc="σ²")
    y = Tensor("y", (B, G * CG, H, W), Role.OUTPUT)
    group = ((c, 0, CG), (i, 0, H), (j, 0, W))
    n_ = CG * H * W
    k = sp.floor(c / CG)                       # channel c's group
    return Layer("GroupNormalization", [x, gamma, beta, mu, var, y], [
        Equation(mu[b, g], Sum(x[b, CG * g + c, i, j], *group) / n_),
        Equation(var[b, g], Sum((x[b, CG * g + c, i, j] - mu[b, g]) ** 2, *group) / n_),
        Equation(y[b, c, i, j], gamma[c] * (x[b, c, i, j] - mu[b, k]) / sp.sqrt(var[b, k] + EPS) + beta[c]),
    ], constants={EPS: NORM_EPSILON})


# --------------------------------------------------------------------------- losses and the rest


def mse_loss() -> Layer:
    """L = Σ_{b,c} (x(b,c) − t(b,c))² / (BC)."""
    x = Tensor("x", (B, C), Role.INPUT)
    t = Tensor("t", (B, C), Role.INPUT)
    loss = Tensor("L", (1,), Role.OUTPUT)
    return Layer("MSELoss", [x, t, loss], [
        Equation(loss[n], Sum((x[b, c] - t[b, c]) ** 2, (b, 0, B), (c, 0, C)) / (B * C))])


def l1_loss() -> Layer:
    """L = Σ_{b,c} |x(b,c) − t(b,c)| / (BC)."""
    x = Tensor("x", (B, C), Role.INPUT)
    t = Tensor("t", (B, C), Role.INPUT)
    loss = Tensor("L", (1,), Role.OUTPUT)
    return Layer("L1Loss", [x, t, loss], [
        Equation(loss[n], Sum(sp.Abs(x[b, c] - t[b, c]), (b, 0, B), (c, 0, C)) / (B * C))])


def residual_add() -> Layer:
    """y = x + r."""
    x = Tensor("x", (B, C, H, W), Role.INPUT)
    r = Tensor("r", (B, C, H, W), Role.INPUT)
    y = Tensor("y", (B, C, H, W), Role.OUTPUT)
    return Layer("ResidualAdd", [x, r, y], [Equation(y[b, c, i, j], x[b, c, i, j] + r[b, c, i, j])])


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class ZooEntry:
    """A zoo layer: its factory, the sizes ``vggen.compile`` needs fixed
    (what no input shape tells), and the PyTorch expression it equals, over
    the layer's inputs by name (``F`` is ``torch.nn.functional``)."""

    layer: Callable[[], Layer]
    torch: str
    sizes: dict = field(default_factory=dict)

    @property
    def doc(self) -> str:
        return (self.layer.__doc__ or "").strip()


ZOO: dict[str, ZooEntry] = {
    "conv3x3_s2": ZooEntry(convolution3x3_stride2, "F.conv2d(x, w, stride=2, padding=1)"),
    "conv5x5_s2": ZooEntry(convolution5x5_stride2, "F.conv2d(x, w, stride=2, padding=2)"),
    "conv2x2_s2": ZooEntry(convolution2x2_stride2, "F.conv2d(x, w, stride=2)"),
    "conv3x3_dilated": ZooEntry(dilated_convolution3x3, "F.conv2d(x, w, padding=2, dilation=2)"),
    "depthwise_conv3x3": ZooEntry(depthwise_convolution3x3, "F.conv2d(x, w[:, None], padding=1, groups=C)"),
    "grouped_conv3x3": ZooEntry(grouped_convolution3x3, "F.conv2d(x, w, padding=1, groups=G)"),
    "avgpool2x2": ZooEntry(average_pooling2x2, "F.avg_pool2d(x, 2)"),
    "global_avgpool": ZooEntry(global_average_pooling, "x.mean(dim=(2, 3))"),
    "maxpool3x3_s2": ZooEntry(max_pooling3x3_stride2, "F.max_pool2d(x, 3, stride=2)"),
    "tanh": ZooEntry(tanh, "torch.tanh(x)"),
    "sigmoid": ZooEntry(sigmoid, "torch.sigmoid(x)"),
    "silu": ZooEntry(silu, "F.silu(x)"),
    "gelu": ZooEntry(gelu, "F.gelu(x)"),
    "softplus": ZooEntry(softplus, "F.softplus(x)"),
    "elu": ZooEntry(elu, "F.elu(x)"),
    "leaky_relu": ZooEntry(leaky_relu, "F.leaky_relu(x, 0.1)"),
    "sample_norm": ZooEntry(sample_normalization, "F.group_norm(x, 1, gamma, beta, eps=1e-5)"),
    "group_norm": ZooEntry(group_normalization, "F.group_norm(x, G, gamma, beta, eps=1e-5)", {"G": 3}),
    "mse_loss": ZooEntry(mse_loss, "F.mse_loss(x, t)"),
    "l1_loss": ZooEntry(l1_loss, "F.l1_loss(x, t)"),
    "residual_add": ZooEntry(residual_add, "x + r"),
    "upsample2x": ZooEntry(nearest_upsampling, "F.interpolate(x, scale_factor=2, mode='nearest')"),
}


def zoo_layers() -> list[Layer]:
    """Every zoo layer, in ``ZOO``'s order."""
    return [entry.layer() for entry in ZOO.values()]


__all__ = ["ZOO", "ZooEntry", "zoo_layers", "convolution", "depthwise_convolution3x3", "grouped_convolution3x3",
           "average_pooling2x2", "global_average_pooling", "max_pooling", "nearest_upsampling", "tanh", "sigmoid",
           "silu", "gelu", "softplus", "elu", "leaky_relu", "sample_normalization", "group_normalization",
           "mse_loss", "l1_loss", "residual_add"]
