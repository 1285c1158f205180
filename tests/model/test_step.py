"""The training step driver: eager everywhere, CUDA graphs on a GPU (skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest

from vggen.errors import VggenError
from vggen.model.network import Network, NonFiniteLoss
from vggen.model.optim import SGD
from vggen.model.step import TrainStep
from vggen.runtime import cuda_available, get_backend

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


# --------------------------------------------------------------------------- graph discipline, on the CPU


class _RecordingCuda:
    """A stand-in for CuPy's stream capture over the C backend: while a stream
    captures, kernel runs are recorded (not run) and any host transfer is an
    error, as in CUDA; a graph's launch replays the recorded runs on the same
    arrays.  So a graph step equals the eager step only if everything a step
    changes flows through the workspace's fixed buffers."""

    def __init__(self, backend):
        self.backend, self.recording = backend, None
        outer = self

        class Stream:
            def __init__(self, non_blocking=False):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def begin_capture(self):
                outer.recording = []

            def end_capture(self):
                runs, outer.recording = outer.recording, None
                return _Graph(runs)

        class Cuda:
            pass

        self.cuda = Cuda()
        self.cuda.Stream = Stream


class _Graph:
    def __init__(self, runs):
        self.runs = runs

    def launch(self, stream=None):
        for run in self.runs:
            run()


def _recording_backend():
    from vggen.runtime.c import CBackend

    class Recording(CBackend):
        def __init__(self):
            super().__init__()
            self.cupy = _RecordingCuda(self)

        def run(self, layer, sizes, arrays, skip=()):
            if self.cupy.recording is not None:
                self.cupy.recording.append(lambda: CBackend.run(self, layer, sizes, arrays, skip))
                return {}
            return super().run(layer, sizes, arrays, skip)

        def copy_in(self, dst, host):
            assert self.cupy.recording is None, "a host transfer inside a captured region"
            super().copy_in(dst, host)

        def to_host(self, a):
            assert self.cupy.recording is None, "a host transfer inside a captured region"
            return super().to_host(a)

    return Recording()


def test_graph_steps_replay_what_eager_steps_compute():
    be = _recording_backend()
    graph_net = Network(be, width=2, seed=1)
    graph_opt = SGD(graph_net.params, graph_net.grads, be, 0.9, 5e-4,
                    flat=(graph_net.flat_params, graph_net.flat_grads))
    step = TrainStep(graph_net, graph_opt, graph=True)
    eager_net, eager_opt = _net_and_opt("c")
    assert _run(step, steps=5) == pytest.approx(_run(TrainStep(eager_net, eager_opt), steps=5), rel=1e-6)
    assert step._graphs[3] is not None and len(step._graphs[3][0].runs) > 20 and len(step._graphs[3][1].runs) == 1
    for k, v in eager_net.host_params().items():
        np.testing.assert_allclose(graph_net.host_params()[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    for k, v in eager_net.host_state().items():
        np.testing.assert_allclose(graph_net.host_state()[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
