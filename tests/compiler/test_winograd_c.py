"""The printed C of the F(2×2, 3×3) forward, compiled with cc, against the direct
convolution on odd shapes."""

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from vggen.compiler.targets.c.winograd import forward_source
from vggen.runtime.winograd import direct_conv2d, winograd_conv2d

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")

# (B, IC, OC, H, W): H, W odd, or even but not tiles of 2, and 1
SHAPES = [(2, 3, 5, 7, 9), (1, 1, 1, 1, 1), (3, 4, 2, 6, 11), (1, 16, 8, 13, 3)]


@pytest.fixture(scope="module")
def forward(tmp_path_factory):
    directory = tmp_path_factory.mktemp("winograd_c")
    source = directory / "winograd_f2x3.c"
    source.write_text(forward_source(2))
    library = directory / "winograd_f2x3.so"
    subprocess.run(["cc", "-O2", "-std=c99", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    "-o", str(library), str(source)], check=True, capture_output=True, text=True)
    fn = ctypes.CDLL(str(library)).winograd_f2x3_forward
    fn.restype = None
    fn.argtypes = [ctypes.c_int] * 5 + [ctypes.c_void_p] * 6

    def run(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        b, ic, h, wd = x.shape
        oc = w.shape[0]
        tiles = b * -(-h // 2) * -(-wd // 2)
        y = np.full((b, oc, h, wd), np.nan, dtype=np.float32)
        U = np.empty(16 * oc * ic, np.float32)
        V = np.empty(16 * ic * tiles, np.float32)
        M = np.empty(16 * oc * tiles, np.float32)
        x, w = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(w, np.float32)
        fn(b, ic, oc, h, wd, *(a.ctypes.data for a in (x, w, y, U, V, M)))
        return y
    return run


def test_transforms_are_printed_from_the_matrices():
    source = forward_source(2)
    # (Bᵀ d B)₀₀ with Bᵀ's first row 1, 0, −1, 0
    assert "v[0] = d[0] - d[2] - d[8] + d[10];" in source
    assert "u[3] = -g[2];" in source                              # G's last row 0, 0, −1


@pytest.mark.parametrize("shape", SHAPES)
def test_c_forward_equals_direct_on_odd_shapes(forward, shape):
    b, ic, oc, h, wd = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((b, ic, h, wd))
    w = rng.standard_normal((oc, ic, 3, 3))
    y = forward(x, w)
    want = direct_conv2d(x, w)
    assert np.max(np.abs(y - want)) / np.max(np.abs(want)) < 2e-6        # the numpy F(2×2)'s float32 bound
    np.testing.assert_allclose(y, winograd_conv2d(x.astype(np.float32), w.astype(np.float32), 2),
                               rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


def test_c_forward_equals_the_direct_c_kernel(forward, own_op_cache):
    """Against vggen's own direct convolution kernel (eq. 1 compiled for c), both float32."""
    import vggen
    from vggen.frontend.layers import convolution2d

    direct = vggen.compile(convolution2d(1), "c")
    for b, ic, oc, h, wd in SHAPES:
        rng = np.random.default_rng(h * wd)
        x = rng.standard_normal((b, ic, h, wd)).astype(np.float32)
        w = rng.standard_normal((oc, ic, 3, 3)).astype(np.float32)
        want = direct.forward(x=x, w=w)["y"]
        assert np.max(np.abs(forward(x, w) - want)) / np.max(np.abs(want)) < 2e-6
