"""The numpy Winograd convolution (transform → batched matrix product → inverse
transform) against the direct one, on shapes that are not multiples of the tile."""

import numpy as np
import pytest

from vggen.frontend.layers import IC, OC, B, H, K, W, convolution2d
from vggen.proof.evaluate import run_forward
from vggen.runtime.winograd import (direct_conv2d, direct_conv2d_weight_gradient, winograd_conv2d,
                                    winograd_conv2d_input_gradient, winograd_conv2d_weight_gradient)

# (B, IC, OC, H, W): H, W odd or not multiples of 2 and 4; one and several channels
SHAPES = [(2, 3, 5, 7, 9), (1, 1, 1, 5, 5), (3, 4, 2, 6, 11), (1, 16, 8, 13, 3), (2, 2, 3, 1, 2)]
# float32 against float64 direct, max |error| / max |y|: 2.3e-7 for F(2×2, 3×3) and
# 1.0e-6 for F(4×4, 3×3) at worst over these shapes and directions; bounds 10× above.
FLOAT32_TOLERANCE = {2: 2e-6, 4: 1e-5}


def _inputs(shape, dtype, seed=0):
    b, ic, oc, h, w = shape
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, ic, h, w)).astype(dtype), rng.standard_normal((oc, ic, 3, 3)).astype(dtype),
            rng.standard_normal((b, oc, h, w)).astype(dtype))


def test_direct_reference_is_eq_1():
    x, w, _ = _inputs(SHAPES[0], np.float64)
    b, ic, oc, h, wd = SHAPES[0]
    consts = {B: b, IC: ic, OC: oc, H: h, W: wd, K: 1}
    y = run_forward(convolution2d(1), {"x": x, "w": w}, consts)["y"]
    np.testing.assert_allclose(direct_conv2d(x, w), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_direct_gradients_are_the_adjoints(shape):
    """⟨conv(x, w), g_y⟩ = ⟨x, g_x⟩ = ⟨w, g_w⟩: the direct references the Winograd ones meet are right."""
    x, w, gy = _inputs(shape, np.float64)
    y = direct_conv2d(x, w)
    gx = direct_conv2d(gy, np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)))
    gw = direct_conv2d_weight_gradient(x, gy)
    inner = np.sum(y * gy)
    assert abs(inner - np.sum(x * gx)) < 1e-10 * max(1.0, abs(inner))
    assert abs(inner - np.sum(w * gw)) < 1e-10 * max(1.0, abs(inner))


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_winograd_equals_direct_in_float64(shape, m):
    x, w, gy = _inputs(shape, np.float64)
    y = direct_conv2d(x, w)
    np.testing.assert_allclose(winograd_conv2d(x, w, m), y, rtol=0, atol=1e-10)
    gx = direct_conv2d(gy, np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)))
    np.testing.assert_allclose(winograd_conv2d_input_gradient(gy, w, m), gx, rtol=0, atol=1e-10)
    np.testing.assert_allclose(winograd_conv2d_weight_gradient(x, gy, m), direct_conv2d_weight_gradient(x, gy),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_winograd_in_float32_within_its_tolerance(shape, m):
    x, w, gy = _inputs(shape, np.float64)
    x32, w32, gy32 = (a.astype(np.float32) for a in (x, w, gy))
    wt = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    pairs = [(winograd_conv2d(x32, w32, m), direct_conv2d(x, w)),
             (winograd_conv2d_input_gradient(gy32, w32, m), direct_conv2d(gy, wt)),
             (winograd_conv2d_weight_gradient(x32, gy32, m), direct_conv2d_weight_gradient(x, gy))]
    for got, want in pairs:
        assert got.dtype == np.float32
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < FLOAT32_TOLERANCE[m]
