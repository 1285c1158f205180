"""The optimizer written as equations: in-place state, one kernel, the network's flat storage."""

from __future__ import annotations

import ctypes
import shutil
import sys

import numpy as np
import pytest

from vggen.compiler.emit import generate
from vggen.compiler.pipeline import lower_layer
from vggen.errors import VggenError
from vggen.frontend.lang import Equation, Layer, Role, Tensor
from vggen.frontend.updates import N, n, sgd_momentum
from vggen.model.network import Network
from vggen.model.optim import SGD, flat_views
from vggen.runtime import get_backend

CXX = shutil.which("g++") or shutil.which("c++")


def sgd_reference(p, v, g, lr, mom, wd):
    v = mom * v + g + wd * p
    return p - lr * v, v


def test_the_update_is_one_in_place_kernel():
    (k,) = lower_layer(sgd_momentum())
    assert k.name == "sgd_forward_v_p"
    assert [a.name for a in k.args if a.access == "write"] == ["p", "v"]
    assert [a.name for a in k.args if a.access == "read"] == ["g", "h"]
    # the step reads the new v from its register, not from memory
    assert "v_v*h[0]" in generate([sgd_momentum()], "c")[1][0].text.replace(" ", "")


def test_an_in_place_update_may_read_only_its_own_element():
    p = Tensor("p", (N,), Role.STATE)
    with pytest.raises(VggenError, match=r"reads the tensor being written"):
        Layer("Shift", [p], [Equation(p[n], p[n] + p[n - 1], "")])
    y = Tensor("y", (N,), Role.OUTPUT)
    x = Tensor("x", (N,), Role.INPUT)
    with pytest.raises(VggenError, match=r"only a state tensor"):
        Layer("Accumulate", [x, y], [Equation(y[n], y[n] + x[n], "")])


@pytest.mark.parametrize("target", ["numpy", "c"])
def test_sgd_kernel_matches_the_formula(target):
    rng = np.random.default_rng(0)
    size = 1037                                   # not a multiple of any vector width
    p, v, g = (rng.standard_normal(size).astype(np.float32) for _ in range(3))
    want_p, want_v = sgd_reference(p.astype(np.float64), v.astype(np.float64), g.astype(np.float64),
                                   0.05, 0.9, 5e-4)
    be = get_backend(target)
    h = np.array([0.05, 0.9, 5e-4], np.float32)
    be.run(sgd_momentum(), {"N": size}, {"p": p, "v": v, "g": g, "h": h})
    np.testing.assert_allclose(p, want_p, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v, want_v, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(CXX is None or sys.platform != "linux", reason="needs g++ and ucontext (Linux)")
def test_sgd_cuda_kernel_in_emulation(tmp_path):
    from tests.compiler.test_cuda_emulation import compile_emulation

    text, kernels = generate([sgd_momentum()], "cuda")
    dll = compile_emulation(text, kernels, tmp_path)
    rng = np.random.default_rng(1)
    size = 3 * 256 + 5                            # more than the grid: grid striding
    p, v, g = (rng.standard_normal(size).astype(np.float32) for _ in range(3))
    h = np.array([0.1, 0.9, 0.01], np.float32)
    want_p, want_v = sgd_reference(p.astype(np.float64), v.astype(np.float64), g.astype(np.float64), 0.1, 0.9, 0.01)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    assert dll.vg_emu_run_sgd_forward_v_p(ptr(g), ptr(h), ptr(p), ptr(v), ctypes.c_int(size), ctypes.c_uint(2)) == 0
    np.testing.assert_allclose(p, want_p, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v, want_v, rtol=1e-6, atol=1e-6)


def test_flat_views_share_one_buffer():
    be = get_backend("numpy")
    flat, views = flat_views(be, {"a": (2, 3), "b": (4,)})
    assert flat.shape == (10,) and all(v.flags.c_contiguous for v in views.values())
    views["b"][...] = 7
    assert flat[6:].tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize("target", ["numpy", "c"])
def test_network_update_is_one_launch_and_equals_per_parameter_sgd(target):
    be = get_backend(target)
    net = Network(be, width=2, seed=1)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 3)
    flat = SGD(net.params, net.grads, be, 0.9, 5e-4, flat=(net.flat_params, net.flat_grads))
    assert len(flat.segments) == 1 and flat.segments[0][0] is net.flat_params
    p0 = net.host_params()
    for step in range(2):
        net.train_step(images, labels, rng=np.random.default_rng(step))
        flat.step(0.1 / (step + 1))
    separate = Network(be, width=2, seed=1)
    per_param = SGD(separate.params, separate.grads, be, 0.9, 5e-4)
    assert len(per_param.segments) == len(p0)
    for step in range(2):
        separate.train_step(images, labels, rng=np.random.default_rng(step))
        per_param.step(0.1 / (step + 1))
    a, b = net.host_params(), separate.host_params()
    for k in p0:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
        assert not np.array_equal(a[k], p0[k]) or k.endswith("beta"), k
    for k, v in flat.host_state().items():
        np.testing.assert_allclose(v, per_param.host_state()[k], rtol=1e-5, atol=1e-7, err_msg=k)
