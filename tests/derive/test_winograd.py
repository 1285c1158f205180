"""Winograd F(m×m, 3×3) transforms from Toom–Cook, and their exact proofs
against the convolution's equation and its derived gradients."""

import pytest
import sympy as sp

from vggen.derive.winograd import POINTS_INTEGER_4, forward_transforms, toom_cook, weight_gradient_transforms
from vggen.proof.winograd import prove_forward, prove_input_gradient, prove_weight_gradient, winograd_rows


def test_f23_from_points_0_1_minus1_is_lavins():
    t = forward_transforms(2)
    assert t.BT == sp.Matrix([[1, 0, -1, 0], [0, 1, 1, 0], [0, 1, -1, 0], [0, 1, 0, -1]])
    assert t.AT == sp.Matrix([[1, 1, 1, 0], [0, 1, -1, 1]])
    assert t.G == sp.Matrix([[1, 0, 0], [sp.Rational(1, 2)] * 3, [-sp.Rational(1, 2), sp.Rational(1, 2),
                                                                   -sp.Rational(1, 2)], [0, 0, -1]])


@pytest.mark.parametrize("m", [2, 4])
def test_data_transform_rows_are_coprime_integers(m):
    t = forward_transforms(m)
    assert t.BT.shape == (m + 2, m + 2) and t.AT.shape == (m, m + 2) and t.G.shape == (m + 2, 3)
    for j in range(t.n):
        row = [v for v in t.BT.row(j) if v != 0]
        assert all(v.is_integer for v in row) and sp.igcd(*row) == 1 if len(row) > 1 else abs(row[0]) == 1


def test_points_are_checked():
    with pytest.raises(ValueError, match="distinct"):
        toom_cook(2, 3, (0, 1, 1))
    with pytest.raises(ValueError, match="needs 3"):
        toom_cook(2, 3, (0, 1))


@pytest.mark.parametrize("m", [2, 4])
def test_every_direction_is_proved(m):
    assert prove_forward(forward_transforms(m)) == []
    assert prove_input_gradient(forward_transforms(m)) == []
    assert prove_weight_gradient(weight_gradient_transforms(m)) == []


def test_other_points_prove_too():
    assert prove_forward(toom_cook(4, 3, POINTS_INTEGER_4)) == []


def test_a_mutated_entry_is_rejected_in_every_direction():
    t = forward_transforms(2)
    BT = t.BT.copy()
    BT[1, 2] = 2                                            # 1 → 2
    assert prove_forward(t.replace(BT=BT))
    G = t.G.copy()
    G[3, 2] = 1                                             # −1 → 1
    assert prove_input_gradient(t.replace(G=G))
    tw = weight_gradient_transforms(2)
    AT = tw.AT.copy()
    AT[2, 1] = 2                                            # 1 → 2
    differences = prove_weight_gradient(tw.replace(AT=AT))
    assert differences and all(i == 2 or j == 2 for i, j, _ in differences)


def test_a_mutation_fails_the_check_row():
    t = forward_transforms(4)
    BT = t.BT.copy()
    BT[0, 0] += 1
    from vggen.proof import winograd
    row = winograd._row("forward", t, prove_forward(t.replace(BT=BT)), "eq. 1")
    assert row.verdict == "fail" and "differ" in row.detail


def test_check_rows_one_per_algorithm_and_direction():
    rows = winograd_rows()
    f2, f4 = "winograd F(2×2, 3×3)", "winograd F(4×4, 3×3)"
    assert [(r.gradient, r.method.split(";")[0]) for r in rows] == [
        ("forward", f2), ("∂L/∂x", f2), ("∂L/∂w", "winograd F(3×3, 2×2)"),
        ("forward", f4), ("∂L/∂x", f4), ("∂L/∂w", "winograd F(3×3, 4×4)")]
    assert all(r.verdict == "pass" and r.equation is None for r in rows)
