"""vggen's derivations: their forms, their proofs, and checks that can fail."""

import dataclasses

import numpy as np
import pytest
import sympy as sp

from vggen.derive.autodiff import derive
from vggen.frontend.lang import ReduceMax, iverson
from vggen.frontend.layers import (
    S,
    batch_normalization,
    convolution2d,
    elementwise_activation,
    max_pooling2d,
    relu,
    vgg_layers,
)
from vggen.proof.document import document_equations
from vggen.proof.verify import NUMERIC_SIZES, check_layer, compare, dot_product_error, finite_difference_error


def doc(number):
    return next(d for d in document_equations() if d.number == number)


def layer_named(name):
    return next(layer for layer in vgg_layers() if layer.name == name)


# --------------------------------------------------------------------------- forms


def test_convolution_input_gradient_is_a_guarded_gather():
    g = derive(convolution2d()).gradient("x").equation
    assert not g.rhs.has(sp.KroneckerDelta)          # no scatter left
    assert g.rhs.has(sp.Piecewise)                   # explicit range guard
    reads = {str(a) for a in g.rhs.atoms(sp.Indexed)}
    assert "g_y[b, oc, -di + i, -dj + j]" in reads


def test_batchnorm_input_gradient_is_compact():
    g = derive(batch_normalization()).gradient("x").equation
    reads = {str(a.base.label) for a in g.rhs.atoms(sp.Indexed)}
    assert reads == {"g_y", "g_gamma", "g_beta", "gamma", "var", "xhat"}
    assert not g.rhs.has(sp.Sum)                     # eq. 50, not eq. 34's expansion


def test_maxpool_gradient_uses_the_saved_selection():
    g = derive(max_pooling2d()).gradient("x").equation
    assert g.rhs.has(sp.floor) and g.rhs.has(sp.Mod)
    assert "sel" in {str(a.base.label) for a in g.rhs.atoms(sp.Indexed)}
    assert not g.rhs.has(sp.Sum)                     # the window sum was pinned by the stride


# --------------------------------------------------------------------------- proofs


@pytest.mark.parametrize("number", ["4", "8", "11", "14", "16", "18", "24", "25", "50", "53", "55"])
def test_document_equation_is_proved(number):
    d = doc(number)
    method, verdict, detail = compare(derive(layer_named(d.layer)), d)
    assert verdict == "pass", detail
    assert method in ("symbolic", "symbolic at sizes")


def mutate(number, expr):
    return dataclasses.replace(doc(number), expr=expr)


def rejected(d):
    method, verdict, detail = compare(derive(layer_named(d.layer)), d)
    return verdict == "fail"


def test_flipped_sign_is_rejected():
    assert rejected(mutate("11", -doc("11").expr))
    assert rejected(mutate("50", -doc("50").expr))


def test_shift_direction_is_rejected():
    d = doc("11")
    b, ic, i, j, di, dj = sp.symbols("b ic i j di dj", integer=True)
    x = sp.IndexedBase("x")
    wrong = d.expr.xreplace({x[b, ic, i + di, j + dj]: x[b, ic, i - di, j - dj]})
    assert wrong != d.expr
    assert rejected(mutate("11", wrong))


def test_missing_normalisation_is_rejected():
    d = doc("50")
    B, H, W = sp.symbols("B H W", integer=True, positive=True)
    wrong = d.expr.xreplace({B: 1, H: 1, W: 1})
    assert wrong != d.expr
    assert rejected(mutate("50", wrong))


def test_relu_strict_inequality_is_rejected():
    d = doc("53")
    pw = d.expr
    (val, cond), rest = pw.args[0], pw.args[1]
    wrong = sp.Piecewise((val, sp.StrictGreaterThan(cond.lhs, cond.rhs)), (rest.expr, rest.cond))
    assert rejected(mutate("53", wrong))


def test_maxpool_gradient_to_every_tied_maximum_is_rejected():
    b, c, i, j, p, q = sp.symbols("b c i j p q", integer=True)
    x, g_y = sp.IndexedBase("x"), sp.IndexedBase("g_y")
    i0, j0 = sp.floor(i / S), sp.floor(j / S)
    window_max = ReduceMax(x[b, c, S * i0 + p, S * j0 + q], (p, 0, S - 1), (q, 0, S - 1))
    wrong = g_y[b, c, i0, j0] * iverson(sp.Eq(x[b, c, i, j], window_max))
    assert rejected(mutate("55", wrong))


# --------------------------------------------------------------------------- layers not in VGG


def leaky_relu():
    return elementwise_activation("LeakyReLU", lambda v: sp.Piecewise((v, v >= 0), (v / 10, True)))


@pytest.mark.parametrize("make", [lambda: convolution2d(2), leaky_relu], ids=["conv5x5", "leaky_relu"])
def test_new_layer_written_only_as_equations_passes_numeric_checks(make):
    layer = make()
    rows = check_layer(layer, docs=[])
    assert rows and all(r.verdict == "pass" for r in rows), rows
    assert all(r.fd_error < 1e-6 for r in rows)


def test_numeric_check_catches_a_wrong_gradient():
    layer = relu()
    bw = derive(layer)
    g = bw.gradients[0]
    g.equation = dataclasses.replace(g.equation, rhs=2 * g.equation.rhs)
    err = finite_difference_error(layer, bw, NUMERIC_SIZES[0], np.random.default_rng(0))
    assert err["g_x"] > 0.1


def test_dot_product_test_covers_linear_maps():
    layer = convolution2d()
    errs = dot_product_error(layer, derive(layer), NUMERIC_SIZES[1], np.random.default_rng(1))
    assert set(errs) == {"g_x", "g_w"} and max(errs.values()) < 1e-12
