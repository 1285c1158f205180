"""Backends and kernel runtimes: the generated C (and, with a GPU, CUDA) kernels
against the NumPy reference for every layer forward and backward at small odd
shapes; the C runtime's compilation, cache, and argument checks."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO
from vggen.derive.autodiff import derive
from vggen.errors import VggenError
from vggen.frontend import layers
from vggen.runtime import get_backend, resolve_target
from vggen.runtime.base import check_argument
from vggen.runtime.numpy import NumpyBackend

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> Path:
    """generated/ of the checkout when it has been built, else a fresh build."""
    here = REPO / "generated"
    if (here / "manifest.json").is_file():
        return here
    from vggen.compiler.emit import build
    out = tmp_path_factory.mktemp("generated")
    build(out)
    return out


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def c_backend(generated, cache):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    from vggen.runtime.c import CBackend
    return CBackend(generated=generated, cache=cache)


@pytest.fixture(scope="session")
def cuda_backend(generated):
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no GPU")
    except Exception as e:   # no driver
        pytest.skip(f"no GPU: {e}")
    from vggen.runtime.cuda import CudaBackend
    return CudaBackend(generated=generated)


# --------------------------------------------------------------------------- cases


def _mask(rng, shape, p=0.4):
    return ((rng.random(shape) >= p) / (1 - p)).astype(np.float32)


def _cases():
    """(id, layer, sizes, inputs(rng) -> dict) at small odd shapes."""
    f32 = lambda rng, *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731

    def relu_x(rng):
        x = f32(rng, 3, 5, 3, 7)
        x.flat[::4] = 0.0                          # the convention at x = 0
        return {"x": x}

    def pool_x(rng):                               # small integers: ties in windows
        return {"x": rng.integers(-2, 3, size=(2, 3, 6, 10)).astype(np.float32)}

    return [
        ("conv", layers.convolution2d(1), {"B": 2, "IC": 3, "OC": 5, "H": 5, "W": 7},
         lambda rng: {"x": f32(rng, 2, 3, 5, 7), "w": f32(rng, 5, 3, 3, 3)}),
        ("conv-1x1", layers.convolution2d(1), {"B": 3, "IC": 7, "OC": 2, "H": 1, "W": 1},
         lambda rng: {"x": f32(rng, 3, 7, 1, 1), "w": f32(rng, 2, 7, 3, 3)}),
        ("linear", layers.linear(), {"B": 3, "IC": 5, "C": 7},
         lambda rng: {"x": f32(rng, 3, 5), "w": f32(rng, 5, 7)}),
        ("dropout", layers.dropout(), {"B": 2, "C": 3, "H": 5, "W": 7},
         lambda rng: {"x": f32(rng, 2, 3, 5, 7), "R": _mask(rng, (2, 3, 5, 7))}),
        ("batchnorm", layers.batch_normalization(), {"B": 3, "C": 5, "H": 3, "W": 5},
         lambda rng: {"x": 2 + 3 * f32(rng, 3, 5, 3, 5), "gamma": f32(rng, 5), "beta": f32(rng, 5)}),
        ("batchnorm-1x1", layers.batch_normalization(), {"B": 5, "C": 3, "H": 1, "W": 1},
         lambda rng: {"x": f32(rng, 5, 3, 1, 1), "gamma": f32(rng, 3), "beta": f32(rng, 3)}),
        ("relu", layers.relu(), {"B": 3, "C": 5, "H": 3, "W": 7}, relu_x),
        ("maxpool", layers.max_pooling2d(2), {"B": 2, "C": 3, "HO": 3, "WO": 5}, pool_x),
        ("softmax-ce", layers.softmax_cross_entropy(), {"B": 3, "C": 7},
         lambda rng: {"x": 5 * f32(rng, 3, 7), "t": np.array([0, 6, 3], np.int32)}),
    ]


CASES = _cases()
IDS = [c[0] for c in CASES]


def _reference(layer, sizes, inputs, rng):
    """NumPy forward, then backward with random seeds: every array by name."""
    ref = NumpyBackend()
    fwd = ref.run(layer, sizes, inputs)
    bw = derive(layer).program
    arrays = {**inputs, **fwd}
    for t in layer.outputs:
        arrays[f"g_{t.name}"] = rng.standard_normal(fwd[t.name].shape).astype(np.float32)
    grads = ref.run(bw, sizes, arrays)
    return fwd, bw, arrays, grads


def _compare(backend, layer, sizes, inputs, to_dev, to_host):
    rng = np.random.default_rng(7)
    fwd, bw, arrays, grads = _reference(layer, sizes, inputs, rng)
    got = backend.run(layer, sizes, {k: to_dev(v) for k, v in inputs.items()})
    for name, want in fwd.items():
        np.testing.assert_allclose(to_host(got[name]), want, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{layer.name} forward {name}")
    got = backend.run(bw, sizes, {k: to_dev(v) for k, v in arrays.items()})
    for name, want in grads.items():
        np.testing.assert_allclose(to_host(got[name]), want, rtol=1e-4, atol=1e-4,
                                   err_msg=f"{layer.name} backward {name}")


# --------------------------------------------------------------------------- numpy backend


def test_numpy_backend_convolution_matches_direct_loops():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = get_backend("numpy").run(layers.convolution2d(1), {"B": 2, "IC": 3, "OC": 4, "H": 5, "W": 7},
                                 {"x": x, "w": w})["y"]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = sum(np.einsum("oc,bchw->bohw", w[:, :, di, dj], xp[:, :, di:di + 5, dj:dj + 7])
               for di in range(3) for dj in range(3))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_numpy_backend_chunks_large_outputs(monkeypatch):
    import vggen.runtime.numpy as B
    monkeypatch.setattr(B, "_BUDGET", 500)        # forces slabs of one row
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 4, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    sizes = {"B": 3, "IC": 2, "OC": 3, "H": 4, "W": 5}
    small = B.NumpyBackend().run(layers.convolution2d(1), sizes, {"x": x, "w": w})["y"]
    monkeypatch.setattr(B, "_BUDGET", 1 << 23)
    whole = B.NumpyBackend().run(layers.convolution2d(1), sizes, {"x": x, "w": w})["y"]
    np.testing.assert_array_equal(small, whole)


def test_program_fills_given_outputs_in_place():
    be = get_backend("numpy")
    x = np.array([[[[-1.0, 2.0]]]], np.float32)
    y = np.full((1, 1, 1, 2), 9.0, np.float32)
    out = be.run(layers.relu(), {"B": 1, "C": 1, "H": 1, "W": 2}, {"x": x, "y": y})
    assert out["y"] is y
    np.testing.assert_array_equal(y, [[[[0.0, 2.0]]]])


def test_missing_size_and_missing_input_are_user_errors():
    be = get_backend("numpy")
    with pytest.raises(VggenError, match="no value for size W"):
        be.run(layers.relu(), {"B": 1, "C": 1, "H": 1}, {})
    with pytest.raises(VggenError, match="no array for x"):
        be.run(layers.relu(), {"B": 1, "C": 1, "H": 1, "W": 1}, {})


def test_unknown_target():
    with pytest.raises(VggenError, match="unknown target 'tpu'"):
        resolve_target("tpu")
    assert resolve_target("numpy") == "numpy"
    assert resolve_target("auto") in ("c", "cuda")


# --------------------------------------------------------------------------- C kernels


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_c_matches_numpy(c_backend, case):
    _, layer, sizes, make = case
    _compare(c_backend, layer, sizes, make(np.random.default_rng(3)), np.asarray, np.asarray)


def test_c_skips_an_unneeded_gradient(c_backend):
    sizes = {"B": 2, "IC": 3, "OC": 2, "H": 3, "W": 3}
    rng = np.random.default_rng(0)
    arrays = {"x": rng.standard_normal((2, 3, 3, 3)).astype(np.float32),
              "w": rng.standard_normal((2, 3, 3, 3)).astype(np.float32),
              "g_y": rng.standard_normal((2, 2, 3, 3)).astype(np.float32),
              "g_x": np.full((2, 3, 3, 3), 7.0, np.float32)}
    out = c_backend.run(derive(layers.convolution2d(1)).program, sizes, arrays, skip=("g_x",))
    assert (out["g_x"] == 7.0).all()              # untouched
    assert np.abs(out["g_w"]).sum() > 0


@pytest.mark.parametrize("bad, what", [
    (lambda x: x.astype(np.float64), "wrong dtype"),
    (lambda x: x[:, :, :, :2], "wrong shape"),
    (lambda x: np.asfortranarray(x), "not C-contiguous"),
    (lambda x: x.tolist(), "wrong array type"),
])
def test_c_checks_every_argument(c_backend, bad, what):
    x = np.ones((2, 3, 4, 3), np.float32)
    sizes = {"B": 2, "C": 3, "H": 4, "W": 3}
    with pytest.raises(VggenError, match=rf"kernel relu_forward_y: argument x (has the |is )?{what}"):
        c_backend.run(layers.relu(), sizes, {"x": bad(x)})
    y = np.ones((2, 3, 4, 3), np.float64)
    with pytest.raises(VggenError, match="kernel relu_forward_y: argument y has the wrong dtype"):
        c_backend.run(layers.relu(), sizes, {"x": x, "y": y})


def test_int_tensors_must_be_int32(c_backend):
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(VggenError, match="argument t has the wrong dtype.*int32"):
        c_backend.run(layers.softmax_cross_entropy(), {"B": 2, "C": 3},
                      {"x": x, "t": np.zeros(2, np.int64)})


def test_check_argument_message_names_kernel_and_argument():
    with pytest.raises(VggenError) as e:
        check_argument("k1", "w", np.zeros((2, 2), np.float32), (2, 3), np.dtype(np.float32))
    assert "kernel k1: argument w has the wrong shape: expected numpy.ndarray float32 (2, 3)" in str(e.value)


def test_library_is_cached_by_content(generated, cache, c_backend, monkeypatch):
    import vggen.runtime.c as rc
    calls = []
    monkeypatch.setattr(rc, "compile_library", lambda *a: calls.append(a))
    again = rc.CBackend(generated=generated, cache=cache)
    assert calls == [] and again.library == c_backend.library
    assert c_backend.library.parent == cache and not list(cache.glob(".*"))   # no temp left


def test_corrupt_cached_library_is_rebuilt(generated, tmp_path):
    import vggen.runtime.c as rc
    sources = sorted((generated / "c").glob("*.c")) + sorted((generated / "c").glob("*.h"))
    key = rc.library_key(sources, rc.find_compiler(), rc.FLAGS)
    (tmp_path / f"{key}.so").write_bytes(b"not a shared library")
    be = rc.CBackend(generated=generated, cache=tmp_path)
    assert be.library == tmp_path / f"{key}.so"
    assert be.library.read_bytes()[:4] == b"\x7fELF"
    x = np.array([[[[-1.0, 3.0]]]], np.float32)
    assert be.run(layers.relu(), {"B": 1, "C": 1, "H": 1, "W": 2}, {"x": x})["y"].tolist() == [[[[0.0, 3.0]]]]


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    from vggen.paths import cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "vggen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "vggen"


def _fake_generated(root: Path, source: str) -> Path:
    (root / "c").mkdir(parents=True)
    (root / "c" / "k.c").write_text(source)
    entry = {"name": "relu_forward_y", "target": "c", "layer": "ReLU", "direction": "forward",
             "class": "elementwise", "file": "c/k.c",
             "signature": [{"name": "x", "kind": "tensor", "dtype": "float32", "access": "read",
                            "shape": ["B", "C", "H", "W"]},
                           {"name": "y", "kind": "tensor", "dtype": "float32", "access": "write",
                            "shape": ["B", "C", "H", "W"]},
                           *[{"name": s, "kind": "size", "dtype": "int", "access": "size"}
                             for s in "BCHW"]]}
    # a hand-written kernel, recorded as a build would: the runtime refuses unlisted sources
    files = {"c/k.c": hashlib.sha256(source.encode()).hexdigest()}
    (root / "manifest.json").write_text(json.dumps({"kernels": [entry], "files": files}))
    return root


def test_compile_failure_carries_the_compiler_message(tmp_path):
    from vggen.runtime.c import CBackend
    gen = _fake_generated(tmp_path / "gen", "void relu_forward_y(const float *x, float *y, int B)\n"
                                            "{ y[0] = x[0] +; }\n")
    with pytest.raises(VggenError) as e:
        CBackend(generated=gen, cache=tmp_path / "cache")
    msg = str(e.value)
    assert msg.startswith("C compilation failed")
    assert "k.c" in msg and "error" in msg           # the compiler's own words
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written


def test_a_hand_written_kernel_runs_through_the_manifest(tmp_path):
    from vggen.runtime.c import CBackend
    gen = _fake_generated(tmp_path / "gen", """
void relu_forward_y(const float *x, float *y, int B, int C, int H, int W)
{ for (long n = 0; n < (long)B * C * H * W; ++n) y[n] = x[n] >= 0 ? x[n] : 0; }
""")
    be = CBackend(generated=gen, cache=tmp_path / "cache")
    x = np.array([-2, -1, 0, 1, 2, 3], np.float32).reshape(1, 2, 3, 1)
    y = be.run(layers.relu(), {"B": 1, "C": 2, "H": 3, "W": 1}, {"x": x})["y"]
    assert y.ravel().tolist() == [0, 0, 0, 1, 2, 3]


def test_missing_compiler(tmp_path, monkeypatch):
    from vggen.runtime.c import CBackend
    gen = _fake_generated(tmp_path / "gen", "void relu_forward_y(void) {}\n")
    monkeypatch.setenv("CC", "no-such-compiler-vggen")
    with pytest.raises(VggenError, match="no C compiler: `no-such-compiler-vggen` was not found"):
        CBackend(generated=gen, cache=tmp_path / "cache")


def test_missing_manifest(tmp_path):
    from vggen.runtime.c import CBackend
    with pytest.raises(VggenError, match="manifest.json not found.*vggen build"):
        CBackend(generated=tmp_path, cache=tmp_path / "cache")


def test_manifest_shape_mismatch_is_caught(tmp_path):
    from vggen.runtime.c import CBackend
    gen = _fake_generated(tmp_path / "gen", "void relu_forward_y(const float *x, float *y, int B,"
                                            " int C, int H, int W) {}\n")
    m = json.loads((gen / "manifest.json").read_text())
    m["kernels"][0]["signature"][0]["shape"] = ["B", "C", "H", "3"]
    (gen / "manifest.json").write_text(json.dumps(m))
    be = CBackend(generated=gen, cache=tmp_path / "cache")
    with pytest.raises(VggenError, match="argument x has shape .* in the manifest"):
        be.program(layers.relu(), {"B": 1, "C": 1, "H": 1, "W": 2})


# --------------------------------------------------------------------------- CUDA


def test_cuda_without_cupy_says_which_extra(monkeypatch, generated):
    monkeypatch.setitem(sys.modules, "cupy", None)          # import cupy → ImportError
    from vggen.runtime.cuda import CudaBackend
    with pytest.raises(VggenError, match=r"install the `cuda` extra"):
        CudaBackend(generated=generated)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_matches_numpy(cuda_backend, case):
    import cupy
    _, layer, sizes, make = case
    _compare(cuda_backend, layer, sizes, make(np.random.default_rng(3)), cupy.asarray, cupy.asnumpy)


def test_cuda_checks_arguments(cuda_backend):
    x = np.ones((2, 3, 4, 3), np.float32)
    with pytest.raises(VggenError, match="kernel relu_forward_y: argument x has the wrong array type"):
        cuda_backend.run(layers.relu(), {"B": 2, "C": 3, "H": 4, "W": 3}, {"x": x})
