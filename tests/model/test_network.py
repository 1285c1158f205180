"""The VGG assembled from the layer kernels: structure, initialisation,
BatchNormalization statistics, dropout masks, one training step on C against
NumPy, and one forward + backward of the whole network against PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vggen.errors import VggenError
from vggen.model.network import BN_EPS, Network, NonFiniteLoss, build_nodes


def _batch(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3, 32, 32)).astype(np.float32),
            rng.integers(0, 10, n).astype(np.int32))


# --------------------------------------------------------------------------- structure


def test_layers_of_the_table():
    nodes = build_nodes(width=4)
    kinds = [n.kind for n in nodes]
    assert kinds.count("conv") == 13 and kinds.count("bn") == 14 and kinds.count("relu") == 14
    assert kinds.count("pool") == 5 and kinds.count("linear") == 2 and kinds[-1] == "loss"
    ratios = [n.ratio for n in nodes if n.kind == "dropout"]
    assert ratios == [0.3, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.5, 0.5]
    convs = [(n.sizes["IC"], n.sizes["OC"], n.sizes["H"]) for n in nodes if n.kind == "conv"]
    assert convs == [(3, 4, 32), (4, 4, 32), (4, 8, 16), (8, 8, 16), (8, 16, 8), (16, 16, 8),
                     (16, 16, 8), (16, 32, 4), (32, 32, 4), (32, 32, 4), (32, 32, 2), (32, 32, 2),
                     (32, 32, 2)]
    fcs = [(n.sizes["IC"], n.sizes["C"]) for n in nodes if n.kind == "linear"]
    assert fcs == [(32, 32), (32, 10)]
    # Linear → BN(B, C, 1, 1) → ReLU → Dropout → Linear → loss
    assert kinds[-6:] == ["linear", "bn", "relu", "dropout", "linear", "loss"]
    assert nodes[-5].in_shape == (32, 1, 1)
    # every layer's input is the previous layer's output
    for a, b in zip(nodes, nodes[1:]):
        assert math.prod(a.out_shape) == math.prod(b.in_shape), (a.name, b.name)


def test_no_dropout_removes_the_dropout_layers():
    assert not [n for n in build_nodes(width=4, dropout=False) if n.kind == "dropout"]


def test_bad_width():
    with pytest.raises(VggenError, match="width"):
        build_nodes(width=0)


def test_initialisation():
    net = Network("numpy", width=16, seed=3)
    p = net.host_params()
    for node in net.nodes:
        if node.kind == "conv" and node.sizes["IC"] >= 64:
            w = p[node.params["w"]]
            assert abs(w.std() / (1 / math.sqrt(9 * node.sizes["IC"])) - 1) < 0.02
            assert abs(w.mean()) < 0.01
        if node.kind == "linear" and node.sizes["C"] > 10:
            w = p[node.params["w"]]
            assert abs(w.std() * math.sqrt(node.sizes["IC"]) - 1) < 0.05
        if node.kind == "bn":
            assert (p[node.params["gamma"]] == 1).all() and (p[node.params["beta"]] == 0).all()
    same = Network("numpy", width=16, seed=3).host_params()
    assert all((same[k] == v).all() for k, v in p.items())
    other = Network("numpy", width=16, seed=4).host_params()
    assert not (other["conv5.w"] == p["conv5.w"]).all()


# --------------------------------------------------------------------------- BN, dropout


def test_batchnorm_running_statistics():
    net = Network("numpy", width=2, seed=0, dropout=False)
    x, y = _batch(4)
    ws = net.forward(x, y, train=True)
    k = next(i for i, n in enumerate(net.nodes) if n.name == "bn1")
    conv_out = ws.forward[k]["x"].astype(np.float64)
    mu = conv_out.mean(axis=(0, 2, 3))
    var = conv_out.var(axis=(0, 2, 3))
    n = 4 * 32 * 32
    state = net.host_state()
    np.testing.assert_allclose(state["bn1.running_mean"], 0.1 * mu, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state["bn1.running_var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-4)


def test_evaluation_uses_running_statistics_and_no_dropout():
    net = Network("numpy", width=2, seed=0, dropout=True)
    rng = np.random.default_rng(0)
    for key, v in net.state.items():
        v[...] = rng.uniform(0.5, 2.0, v.shape) if key.endswith("var") else rng.normal(size=v.shape)
    for key, v in net.params.items():
        if ".gamma" in key or ".beta" in key:
            v[...] = rng.normal(size=v.shape)
    x, y = _batch(5)
    ws = net.forward(x, y, train=False)
    for k, node in enumerate(net.nodes):
        a = ws.forward[k]
        if node.kind == "bn":
            m, v = net.state[f"{node.name}.running_mean"], net.state[f"{node.name}.running_var"]
            want = (a["gamma"][None, :, None, None] * (a["x"] - m[None, :, None, None])
                    / np.sqrt(v[None, :, None, None] + BN_EPS) + a["beta"][None, :, None, None])
            np.testing.assert_allclose(a["y"], want, rtol=1e-5, atol=1e-5)
        if node.kind == "dropout":
            assert a["y"] is a["x"]
    loss, correct = net.evaluate(x, y)
    assert math.isfinite(loss) and 0 <= correct <= 5


def test_dropout_masks_are_seeded_and_scaled():
    net = Network("numpy", width=2, seed=0, dropout=True)
    ws = net.workspace(8, train=True)
    net.draw_masks(ws, np.random.default_rng(11))
    masks = net.masks(8)
    net.draw_masks(ws, np.random.default_rng(11))
    again = net.masks(8)
    for node in net.nodes:
        if node.kind != "dropout":
            continue
        r = masks[node.name]
        assert set(np.unique(r)) <= {0.0, np.float32(1 / (1 - node.ratio))}
        if r.size > 10000:
            assert abs((r == 0).mean() - node.ratio) < 0.02
        np.testing.assert_array_equal(r, again[node.name])


def test_non_finite_loss_is_an_error():
    net = Network("numpy", width=2, seed=0, dropout=False)
    x, y = _batch(2)
    net.params["fc2.w"][0, 0] = np.nan       # (a NaN pixel would not do: ReLU maps NaN to 0)
    with pytest.raises(NonFiniteLoss, match="loss is nan"):
        net.train_step(x, y)


def test_bad_batch():
    net = Network("numpy", width=2, seed=0, dropout=False)
    x, y = _batch(2)
    with pytest.raises(VggenError, match="labels must be in 0..9"):
        net.train_step(x, np.array([0, 10], np.int32))
    with pytest.raises(VggenError, match="do not fit the network"):
        net.train_step(x[:, :, :16], y)


# --------------------------------------------------------------------------- C against NumPy


@pytest.mark.parametrize("dropout", [False, True])
def test_one_training_step_c_equals_numpy(c_backend, dropout):
    x, y = _batch(3, seed=1)
    ref = Network("numpy", width=4, seed=2, dropout=dropout)
    net = Network(c_backend, width=4, seed=2, dropout=dropout)
    a = ref.train_step(x, y, np.random.default_rng(5) if dropout else None)
    b = net.train_step(x, y, np.random.default_rng(5) if dropout else None)
    assert b.loss == pytest.approx(a.loss, rel=1e-3)
    assert a.correct == b.correct
    ga, gb = ref.host_grads(), net.host_grads()
    assert ga.keys() == gb.keys() and len(ga) == 13 + 2 * 14 + 2
    for k in ga:
        scale = np.abs(ga[k]).max()
        np.testing.assert_allclose(gb[k], ga[k], rtol=1e-3, atol=1e-3 * scale, err_msg=k)
    sa, sb = ref.host_state(), net.host_state()
    for k in sa:
        np.testing.assert_allclose(sb[k], sa[k], rtol=1e-3, atol=1e-5, err_msg=k)
    # evaluation mode too, and a batch size of its own (a second workspace)
    la, ca = ref.evaluate(x[:2], y[:2])
    lb, cb = net.evaluate(x[:2], y[:2])
    assert lb == pytest.approx(la, rel=1e-3) and ca == cb


# --------------------------------------------------------------------------- PyTorch


def _torch_reference(net: Network, x, y, masks):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for k, v in net.host_params().items()}
    h = torch.tensor(x, dtype=torch.float64)
    for node in net.nodes:
        p = {t: params[k] for t, k in node.params.items()}
        for kind, name in node.members or [(node.kind, node.name)]:    # a fused node: its parts
            if kind == "conv":
                h = F.conv2d(h, p["w"], padding=1)
            elif kind == "bn":
                h = F.batch_norm(h, None, None, p["gamma"], p["beta"], training=True, eps=BN_EPS)
            elif kind == "relu":
                h = F.relu(h)
            elif kind == "dropout":
                h = h * torch.tensor(masks[name], dtype=torch.float64).reshape(h.shape)
            elif kind == "pool":
                h = F.max_pool2d(h, 2)
            elif kind == "linear":
                h = h.reshape(h.shape[0], -1) @ p["w"]
            elif kind == "loss":
                h = F.cross_entropy(h, torch.tensor(y, dtype=torch.long))
    h.backward()
    return float(h.detach()), {k: v.grad.numpy() for k, v in params.items()}


@pytest.mark.parametrize("target", ["numpy", "c", "cuda"])
def test_whole_network_matches_pytorch_autograd(target, request):
    pytest.importorskip("torch")
    if target == "c":
        backend = request.getfixturevalue("c_backend")
    elif target == "cuda":
        cupy = pytest.importorskip("cupy")
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                pytest.skip("no GPU")
        except Exception as e:
            pytest.skip(f"no GPU: {e}")
        from vggen.runtime import get_backend
        backend = get_backend("cuda")
    else:
        backend = "numpy"
    x, y = _batch(4, seed=3)
    net = Network(backend, width=4, seed=5, dropout=True)
    res = net.train_step(x, y, np.random.default_rng(9))
    loss, grads = _torch_reference(net, x, y, net.masks(4))
    assert res.loss == pytest.approx(loss, rel=1e-4)
    mine = net.host_grads()
    for k, want in grads.items():
        scale = np.abs(want).max()
        np.testing.assert_allclose(mine[k], want, rtol=1e-3, atol=1e-3 * scale, err_msg=k)
