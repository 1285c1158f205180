"""The front end rejects bad equations with an error that names the access."""

import pytest
import sympy as sp

from vggen.errors import VggenError
from vggen.frontend.lang import Equation, Layer, Role, Sum, Tensor, indices, sizes

B, C, H = sizes("B C H")
b, c, i, k = indices("b c i k")


def tensors(zero_outside=False):
    x = Tensor("x", (B, C, H), Role.INPUT, zero_outside=zero_outside)
    y = Tensor("y", (B, C, H), Role.OUTPUT)
    return x, y


def test_a_good_equation_is_accepted():
    x, y = tensors()
    Layer("ok", [x, y], [Equation(y[b, c, i], Sum(x[b, k, i], (k, 0, C)))])


def test_unbound_index_is_named():
    x, y = tensors()
    with pytest.raises(VggenError, match=r"x\[b, k, i\].*index k is bound neither"):
        Layer("bad", [x, y], [Equation(y[b, c, i], x[b, k, i])])


def test_wrong_number_of_indices_is_named():
    x, y = tensors()
    with pytest.raises(VggenError, match=r"access x\[b, c\] has 2 indices; x has rank 3"):
        x[b, c]
    raw = sp.IndexedBase("x")[b, c]
    with pytest.raises(VggenError, match=r"access x\[b, c\].*2 indices; x has rank 3"):
        Layer("bad", [x, y], [Equation(y[b, c, i], raw)])


def test_undeclared_tensor_is_named():
    x, y = tensors()
    z = sp.IndexedBase("z")[b, c, i]
    with pytest.raises(VggenError, match=r"access z\[b, c, i\].*tensor 'z' is not declared"):
        Layer("bad", [x, y], [Equation(y[b, c, i], x[b, c, i] + z)])


def test_access_leaving_range_needs_zero_outside():
    x, y = tensors()
    with pytest.raises(VggenError, match=r"access x\[b, c, i \+ 1\].*can leave the range of x in dimension 2"):
        Layer("bad", [x, y], [Equation(y[b, c, i], x[b, c, i + 1])])
    x0, y0 = tensors(zero_outside=True)
    Layer("shift", [x0, y0], [Equation(y0[b, c, i], x0[b, c, i + 1])])


def test_lhs_must_be_plain_distinct_indices():
    x, y = tensors()
    with pytest.raises(VggenError, match=r"y\[b, b, i\].*distinct plain indices"):
        Layer("bad", [x, y], [Equation(y[b, b, i], x[b, c, i])])


def test_unknown_symbol_is_named():
    x, y = tensors()
    alpha = sp.Symbol("alpha")
    with pytest.raises(VggenError, match=r"symbol alpha .*neither an index"):
        Layer("bad", [x, y], [Equation(y[b, c, i], alpha * x[b, c, i])])
