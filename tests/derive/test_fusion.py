"""Layers composed by ``lang.chain``: their derivation, kernels and use in the network.

BN → ReLU (→ Dropout) is written nowhere as one layer: ``chain`` substitutes
each part's output into the next, ``derive`` differentiates the whole, and
the kernels come from the same templates as every other layer.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from vggen.compiler.emit import generate
from vggen.compiler.pipeline import lower_layer
from vggen.derive.autodiff import derive
from vggen.errors import VggenError
from vggen.frontend.lang import Equation, Layer, Role, Tensor, chain, indices
from vggen.frontend.layers import (
    B,
    C,
    batch_normalization,
    batch_normalization_relu,
    batch_normalization_relu_dropout,
    convolution2d,
    dropout,
    linear,
    relu,
)
from vggen.model.network import Network, build_nodes
from vggen.proof.verify import NUMERIC_SIZES, check_layer, composition_error

b, c = indices("b c")


def reads(expr) -> set:
    return {str(a.base.label) for a in expr.atoms(sp.Indexed)}


# --------------------------------------------------------------------------- the composition


def test_chain_substitutes_elementwise_outputs_and_keeps_names():
    layer = batch_normalization_relu_dropout()
    assert [t.name for t in layer.tensors] == ["x", "gamma", "beta", "mu", "var", "xhat", "R", "y"]
    assert [p.name for p, _ in layer.parts] == ["BatchNormalization", "ReLU", "Dropout"]
    y = layer.definition("y")
    assert y.label == "eq. 17 ∘ eq. 51 ∘ eq. 22"
    assert reads(y.rhs) == {"xhat", "gamma", "beta", "R"}          # BN's y never stored


def test_chain_keeps_an_output_defined_by_a_reduction_as_saved():
    x = Tensor("x", (B, C), Role.INPUT)
    y = Tensor("y", (B, C), Role.OUTPUT)
    square = Layer("Square", [x, y], [Equation(y[b, c], x[b, c] ** 2, "")])
    layer = chain("Linear+Square", linear(), square)
    saved = layer.tensor("y0")
    assert saved.role is Role.SAVED and layer.definition("y0").rhs.has(sp.Sum)
    rows = check_layer(layer, [])
    assert rows and all(r.verdict == "pass" for r in rows), [(r.gradient, r.detail) for r in rows]


def test_chain_rejects_parts_that_do_not_connect():
    with pytest.raises(VggenError, match="shape"):
        chain("Conv+Linear", convolution2d(1), linear())
    with pytest.raises(VggenError, match="at least two"):
        chain("Alone", relu())
    x = Tensor("u", (B, C), Role.INPUT)
    y = Tensor("y", (B, C), Role.OUTPUT)
    no_x = Layer("NoX", [x, y], [Equation(y[b, c], x[b, c], "")])
    with pytest.raises(VggenError, match="no input x"):
        chain("Linear+NoX", linear(), no_x)


# --------------------------------------------------------------------------- the derivation


def test_fused_backward_folds_the_masks_into_eq_50():
    bw = derive(batch_normalization_relu_dropout())
    g_x = bw.gradient("x").equation.rhs
    # the compact form: no sums, BN's input and mean never read again
    assert not g_x.has(sp.Sum)
    assert reads(g_x) == {"g_y", "R", "xhat", "gamma", "beta", "var", "g_gamma", "g_beta"}
    for name in ("gamma", "beta"):
        rhs = bw.gradient(name).equation.rhs
        assert isinstance(rhs, sp.Sum) and {"R", "g_y"} <= reads(rhs)


def test_fused_layers_pass_finite_differences_and_equal_their_parts():
    for layer in (batch_normalization_relu(), batch_normalization_relu_dropout()):
        rows = check_layer(layer, [])
        assert len(rows) == 3 and all(r.verdict == "pass" for r in rows), [r.detail for r in rows]
        assert all(r.method == "composition; numeric" for r in rows)


def test_composition_check_rejects_a_dropped_mask():
    """A fused ∂L/∂x without the ReLU mask is what a wrong fusion would give:
    the check against the parts' own backwards must fail it."""
    layer = batch_normalization_relu()
    bw = derive(layer)
    g = bw.gradient("x")
    wrong = g.equation.rhs.replace(lambda n: isinstance(n, sp.Piecewise), lambda n: sp.Integer(1))
    assert wrong != g.equation.rhs
    good = composition_error(layer, bw, NUMERIC_SIZES[0], np.random.default_rng(0))
    g.equation = Equation(g.equation.lhs, wrong, g.equation.label)
    bad = composition_error(layer, bw, NUMERIC_SIZES[0], np.random.default_rng(0))
    assert max(good.values()) < 1e-12
    assert bad["g_x"] > 1e-2


# --------------------------------------------------------------------------- the kernels


def test_fused_reductions_share_one_pass():
    kernels = {k.name: k for k in lower_layer(derive(batch_normalization_relu()).program,
                                              {"epsilon": 2e-5})}
    (red,) = [k for k in kernels.values() if "g_gamma" in k.name]
    (one,) = red.passes
    (nest,) = one.nests
    assert sorted(r.acc.name for r in nest.reductions) == ["acc_g_beta", "acc_g_gamma"]
    # σ² reads μ: the statistics take two passes
    (stats,) = [k for k in lower_layer(batch_normalization_relu(), {"epsilon": 2e-5}) if "mu" in k.name]
    assert len(stats.passes) == 2


def test_data_guards_print_as_selects_and_range_guards_as_branches():
    _, fused = generate([batch_normalization_relu()], "c")
    for k in fused:
        if k.ir.direction == "backward" or "xhat" in k.name:
            assert "vg_select(" in k.text and " ? " not in k.text, k.name
    _, conv = generate([convolution2d(1)], "c")
    g_x = next(k for k in conv if k.name.endswith("g_x"))
    assert "vg_select(" not in g_x.text


# --------------------------------------------------------------------------- the network


def test_network_fuses_every_block():
    kinds = [n.kind for n in build_nodes(width=2, fuse=True)]
    assert "bn" not in kinds and "relu" not in kinds
    assert kinds.count("bn_relu_dropout") == 8 + 1 and kinds.count("bn_relu") == 13 - 8
    assert "dropout" in kinds                       # the one after the last pooling stays alone
    nodes = build_nodes(width=2, fuse=True)
    fused = next(n for n in nodes if n.kind == "bn_relu_dropout")
    assert (fused.name, fused.mask_name) == ("bn1", "drop1")


@pytest.mark.parametrize("target", ["numpy", "c"])
def test_fused_network_equals_the_unfused_one(target):
    rng = np.random.default_rng(3)
    images = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 3)
    out = {}
    for fuse in (False, True):
        net = Network(target, width=2, seed=1, fuse=fuse)
        step = net.train_step(images, labels, rng=np.random.default_rng(7))
        out[fuse] = (step.loss, net.host_grads(), net.host_state(), net.masks(3), net.evaluate(images, labels))
    assert out[True][3].keys() == out[False][3].keys()
    for name, mask in out[False][3].items():
        np.testing.assert_array_equal(out[True][3][name], mask)
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    for name, g in out[False][1].items():
        np.testing.assert_allclose(out[True][1][name], g, rtol=1e-3, atol=1e-5, err_msg=name)
    for name, s in out[False][2].items():
        np.testing.assert_allclose(out[True][2][name], s, rtol=1e-4, atol=1e-6, err_msg=name)
    assert out[True][4][0] == pytest.approx(out[False][4][0], rel=1e-4)
    assert out[True][4][1] == out[False][4][1]


def test_dropout_alone_is_untouched_by_fusion():
    assert dropout().name == "Dropout"
    assert batch_normalization().parts == ()


def test_fusion_is_on_by_default_except_on_the_c_target():
    assert Network("numpy", width=2).fuse is True
    assert Network("c", width=2).fuse is False
    assert Network("c", width=2, fuse=True).fuse is True
    assert any(n.kind == "bn_relu" for n in Network("c", width=2, fuse=True).nodes)
