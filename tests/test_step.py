"""The training step driver: eager everywhere, CUDA graphs on a GPU (skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest

from vggen.backends import cuda_available, get_backend
from vggen.errors import VggenError
from vggen.network import Network, NonFiniteLoss
from vggen.optim import SGD
from vggen.step import TrainStep

needs_gpu = pytest.mark.skipif(not cuda_available(), reason="no GPU (CuPy and a device)")


def _batch(seed, batch=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, batch)


def _net_and_opt(target, **kw):
    be = get_backend(target)
    net = Network(be, width=2, seed=1, **kw)
    return net, SGD(net.params, net.grads, be, 0.9, 5e-4, flat=(net.flat_params, net.flat_grads))


def _run(step, steps=4, dropout=True):
    losses = []
    for k in range(steps):
        images, labels = _batch(k)
        losses.append(step(images, labels, 0.05 / (k + 1),
                           rng=np.random.default_rng(10 + k) if dropout else None).loss)
    return losses


def test_eager_step_is_forward_backward_then_update():
    net, opt = _net_and_opt("c")
    images, labels = _batch(0)
    p0 = net.host_params()
    res = TrainStep(net, opt)(images, labels, 0.1, rng=np.random.default_rng(1))
    ref, ref_opt = _net_and_opt("c")
    want = ref.train_step(images, labels, rng=np.random.default_rng(1))
    ref_opt.step(0.1)
    assert res.loss == want.loss and res.correct == want.correct
    for k, v in ref.host_params().items():
        np.testing.assert_array_equal(net.host_params()[k], v)
        assert not np.array_equal(v, p0[k]) or k.endswith("beta")


def test_graphs_need_the_cuda_target():
    net, opt = _net_and_opt("c")
    with pytest.raises(VggenError, match="cuda target"):
        TrainStep(net, opt, graph=True)


@needs_gpu
def test_graph_steps_equal_eager_steps():
    eager_net, eager_opt = _net_and_opt("cuda")
    graph_net, graph_opt = _net_and_opt("cuda")
    a = _run(TrainStep(eager_net, eager_opt))
    b = _run(TrainStep(graph_net, graph_opt, graph=True))
    np.testing.assert_allclose(b, a, rtol=1e-6)
    for k, v in eager_net.host_params().items():
        np.testing.assert_allclose(graph_net.host_params()[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    for k, v in eager_net.host_state().items():
        np.testing.assert_allclose(graph_net.host_state()[k], v, rtol=1e-5, atol=1e-7, err_msg=k)


@needs_gpu
def test_a_graph_step_stops_on_a_non_finite_loss_before_the_update():
    net, opt = _net_and_opt("cuda", dropout=False)
    step = TrainStep(net, opt, graph=True)
    _run(step, steps=2, dropout=False)                # eager, then captured
    net.params["fc2.w"][0, 0] = np.nan
    before = net.host_params()
    with pytest.raises(NonFiniteLoss):
        _run(step, steps=1, dropout=False)
    after = net.host_params()
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v)
