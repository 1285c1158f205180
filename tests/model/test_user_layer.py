"""A model with layers of the user's own (the ``layer FILE.py:FUNCTION`` entry):
written as equations in a file of the user's, built into the network with
shapes read from the activations, trained through ``vggen train`` and resumed,
its gradients equal to the numpy target's and to finite differences, and
every mistake one line naming the model file and line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.faults.cli import one_line_error, vggen
from vggen.errors import VggenError
from vggen.model import checkpoint as ckpt
from vggen.model.architecture import load_model
from vggen.model.network import Network, build_nodes

LAYERS = '''\
"""Layers of my own: a swish with a learned slope, S×S average pooling, a dense layer."""
import math

from vggen.frontend.functions import sigmoid
from vggen.frontend.lang import Equation, Layer, Role, Sum, Tensor, indices, sizes

N, C, H, W, HO, WO, S, F = sizes("N C H W HO WO S F")
n, c, i, j, p, q = indices("n c i j p q")


def swish():
    """y = x·σ(β_c·x): SiLU at β = 1."""
    x = Tensor("x", (N, C, H, W), Role.INPUT)
    beta = Tensor("beta", (C,), Role.PARAMETER)
    y = Tensor("y", (N, C, H, W), Role.OUTPUT)
    return Layer("Swish", [x, beta, y],
                 [Equation(y[n, c, i, j], x[n, c, i, j] * sigmoid(beta[c] * x[n, c, i, j]))])


def average_pooling():
    """The mean of each S×S window, stride S: the shapes cannot tell S."""
    x = Tensor("x", (N, C, S * HO, S * WO), Role.INPUT)
    y = Tensor("y", (N, C, HO, WO), Role.OUTPUT)
    return Layer("AveragePooling", [x, y], [Equation(
        y[n, c, i, j], Sum(x[n, c, S * i + p, S * j + q], (p, 0, S), (q, 0, S)) / (S * S))])


def dense(features):
    """z = a·w + bias on the flattened activations; ``features`` from the model file."""
    a = Tensor("a", (N, F), Role.INPUT)
    w = Tensor("w", (F, features), Role.PARAMETER)
    bias = Tensor("bias", (features,), Role.PARAMETER)
    z = Tensor("z", (N, features), Role.OUTPUT)
    return Layer("Dense", [a, w, bias, z],
                 [Equation(z[n, c], Sum(a[n, i] * w[i, c], (i, 0, F)) + bias[c])])


def initialise_dense(shapes, rng):
    fan_in = shapes["w"][0]
    return {"w": rng.standard_normal(shapes["w"]) / math.sqrt(fan_in),
            "bias": [0.0] * shapes["bias"][0]}
'''

MODEL = """\
# a small VGG with a swish and an average pooling of its own
block 1
layer layers.py:swish
layer layers.py:average_pooling S=2     # 32×32 → 16×16
block 2
pool
layer layers.py:dense features=16
layer layers.py:swish
linear classes
loss
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("user-layer")
    (directory / "layers.py").write_text(LAYERS)
    (directory / "model.vgg").write_text(MODEL)
    return directory


def _batch(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n,) + shape).astype(np.float32),
            rng.integers(0, 10, n).astype(np.int32))


# --------------------------------------------------------------------------- building


def test_the_network_builds_with_shapes_read_from_the_activations(model_dir):
    model = load_model(str(model_dir / "model.vgg"))
    assert model.layer_files == {"layers.py": model.entries[1][1].sha256}
    nodes = build_nodes(4, model=model, fuse=True)
    assert [n.kind for n in nodes] == ["conv", "bn_relu", "layer", "layer", "conv", "bn_relu", "pool",
                                       "layer", "layer", "linear", "loss"]
    swish, pool, dense, swish2 = (n for n in nodes if n.kind == "layer")
    assert (swish.name, swish.sizes, swish.in_shape, swish.out_shape) == \
        ("swish1", {"C": 4, "H": 32, "W": 32}, (4, 32, 32), (4, 32, 32))
    assert swish.params == {"beta": "swish1.beta"} and swish.all_sizes(8)["N"] == 8
    assert (pool.sizes, pool.out_shape) == ({"S": 2, "C": 4, "HO": 16, "WO": 16}, (4, 16, 16))
    assert (dense.sizes, dense.in_shape, dense.out_shape) == ({"F": 8 * 8 * 8}, (512,), (16,))
    assert dense.params == {"w": "dense1.w", "bias": "dense1.bias"}
    assert (swish2.name, swish2.in_shape) == ("swish2", (16, 1, 1))     # (B, 16) seen as (B, C, 1, 1)
    assert nodes[-2].sizes == {"IC": 16, "C": 10}


def test_parameters_start_from_the_files_initialiser_or_the_default(model_dir):
    net = Network("numpy", width=4, model=str(model_dir / "model.vgg"), dropout=False)
    p = net.host_params()
    assert (p["swish1.beta"] == 1).all() and p["swish1.beta"].shape == (4,)     # default: rank 1 ones
    assert (p["dense1.bias"] == 0).all() and p["dense1.w"].shape == (512, 16)    # initialise_dense
    assert abs(p["dense1.w"].std() * math.sqrt(512) - 1) < 0.1
    assert net.flat_params.size == net.parameter_count()           # in the one flat buffer


# --------------------------------------------------------------------------- gradients


def test_one_step_on_c_equals_the_numpy_network(model_dir):
    """The user's nodes run their vggen.compile op on c, the equations on numpy."""
    model, shape = str(model_dir / "model.vgg"), (3, 8, 8)
    images, labels = _batch(4, shape)
    nets = {t: Network(t, width=2, model=model, dropout=False, image_shape=shape, seed=1)
            for t in ("c", "numpy")}
    user = [n for n in nets["c"].nodes if n.kind == "layer"]
    assert all(nets["c"].backend_for(n) is n.op.backend is not nets["c"].backend for n in user)
    assert user[0].op.directory.parent.name == "ops"                 # vggen.compile's cache
    steps = {t: net.train_step(images, labels) for t, net in nets.items()}
    assert steps["c"].loss == pytest.approx(steps["numpy"].loss, rel=1e-5)
    grads = {t: net.host_grads() for t, net in nets.items()}
    for key, want in grads["numpy"].items():
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(grads["c"][key], want, rtol=1e-3, atol=1e-5 * scale, err_msg=key)


# No ReLU, max pooling or BatchNormalization: a smooth loss, so that central
# differences of float32 activations (step 1e-2) agree with the gradient to
# about 1e-4 (with ReLU's kinks and batch statistics they stray by percents).
SMOOTH = """\
conv 1
layer layers.py:swish
layer layers.py:average_pooling S=2
layer layers.py:dense features=16
layer layers.py:swish
linear classes
loss
"""


def test_gradients_through_the_users_layers_equal_finite_differences(model_dir):
    """Every parameter's gradient along a random direction against central
    differences of the loss: the seeds, saved tensors and gradients the
    workspace wires into the users' nodes."""
    (model_dir / "smooth.vgg").write_text(SMOOTH)
    shape = (3, 8, 8)
    images, labels = _batch(4, shape)
    net = Network("numpy", width=2, model=str(model_dir / "smooth.vgg"), dropout=False,
                  image_shape=shape, seed=1)
    net.train_step(images, labels)
    grads, params = net.host_grads(), net.host_params()
    assert set(params) == {"conv1.w", "swish1.beta", "dense1.w", "dense1.bias", "swish2.beta", "fc1.w"}
    rng, eps = np.random.default_rng(2), 1e-2
    for key, value in params.items():
        direction = rng.standard_normal(value.shape).astype(np.float32)
        losses = []
        for sign in (1, -1):
            net.load({**params, key: value + sign * eps * direction})
            losses.append(net.train_step(images, labels).loss)
        net.load(params)
        numeric = (losses[0] - losses[1]) / (2 * eps)
        analytic = float((grads[key].astype(np.float64) * direction).sum())
        assert numeric == pytest.approx(analytic, rel=2e-3, abs=1e-5), key


# --------------------------------------------------------------------------- vggen train


def test_vggen_train_runs_the_model_and_resumes_only_the_same_layers(model_dir, tmp_path):
    model, ck = model_dir / "model.vgg", tmp_path / "ck"
    res = vggen("train", "--target", "c", "--dataset", "digits", "--model", model, "--width", "4",
                "--batch-size", "64", "-q", "--epochs", "1", "--schedule-epochs", "2", "--checkpoint", ck)
    assert res.returncode == 0, res.stderr
    header = json.loads((ck / "checkpoint.json").read_text())
    assert header["layer_files"] == load_model(str(model)).layer_files
    res = vggen("train", "-q", "--resume", ck, "--epochs", "2")
    assert res.returncode == 0, res.stderr
    header = json.loads((ck / "checkpoint.json").read_text())
    assert header["epoch"] == 2 and math.isfinite(header["history"][-1]["test_loss"])
    assert header["history"][-1]["test_acc"] > 0.2

    layers = model_dir / "layers.py"
    try:                       # the same parameters in another layer: refused, before any work
        layers.write_text(LAYERS.replace("sigmoid(beta[c] * x", "sigmoid(2 * beta[c] * x"))
        one_line_error(vggen("train", "--resume", ck, "--epochs", "3", "--schedule-epochs", "3"),
                       f"checkpoint {ck}", "was trained with another layers.py", "start a new run")
    finally:
        layers.write_text(LAYERS)


# --------------------------------------------------------------------------- mistakes


BROKEN = '''\
from vggen.frontend.lang import Equation, Layer, Role, Tensor, indices, sizes
B, C = sizes("B C")
b, c = indices("b c")


def raises():
    return {}["missing"]


def not_a_layer():
    return 42


def no_input():
    w = Tensor("w", (C,), Role.PARAMETER)
    y = Tensor("y", (B, C), Role.OUTPUT)
    return Layer("NoInput", [w, y], [Equation(y[b, c], w[c])])


def two_inputs():
    x, r = Tensor("x", (B, C), Role.INPUT), Tensor("r", (B, C), Role.INPUT)
    y = Tensor("y", (B, C), Role.OUTPUT)
    return Layer("Add", [x, r, y], [Equation(y[b, c], x[b, c] + r[b, c])])


def two_outputs():
    x = Tensor("x", (B, C), Role.INPUT)
    y, z = Tensor("y", (B, C), Role.OUTPUT), Tensor("z", (B, C), Role.OUTPUT)
    return Layer("Two", [x, y, z], [Equation(y[b, c], x[b, c]), Equation(z[b, c], -x[b, c])])


def bad_initialiser():
    x = Tensor("x", (B, C), Role.INPUT)
    s = Tensor("s", (C,), Role.PARAMETER)
    y = Tensor("y", (B, C), Role.OUTPUT)
    return Layer("Scale", [x, s, y], [Equation(y[b, c], s[c] * x[b, c])])


def initialise_bad_initialiser(shapes, rng):
    return {"s": [1.0, 2.0]}
'''


def _model_with(directory, line: str):
    path = directory / "mistake.vgg"
    path.write_text(f"block 1\n{line}\nlinear classes\nloss\n")
    return path


@pytest.mark.parametrize("line, words", [
    ("layer nowhere.py:swish", "no layer file nowhere.py (looked for "),
    ("layer layers.py", "layer takes FILE.py:FUNCTION [NAME=VALUE ...], got 'layers.py'"),
    ("layer layers.txt:swish", "the layer file 'layers.txt' must be Python (FILE.py)"),
    ("layer layers.py:mish", "layers.py has no function 'mish' (it defines average_pooling, dense, "),
    ("layer syntax.py:f", "loading syntax.py raised SyntaxError: invalid syntax (syntax.py, line 2)"),
    ("layer crash.py:f", "loading crash.py raised ZeroDivisionError: division by zero (crash.py, line 3)"),
    ("layer broken.py:raises", "raises() of broken.py raised KeyError: 'missing' (broken.py, line 7)"),
    ("layer layers.py:dense", "dense() of layers.py raised TypeError: dense() missing 1 required"),
    ("layer broken.py:not_a_layer", "not_a_layer() of broken.py returned int, not a vggen.frontend.lang.Layer"),
    ("layer broken.py:no_input", "reads exactly one Role.INPUT tensor, the previous node's output "
                                 "(parameters are Role.PARAMETER); it has none"),
    ("layer broken.py:two_inputs", "reads exactly one Role.INPUT tensor, the previous node's output "
                                   "(parameters are Role.PARAMETER); it has 2 (x, r)"),
    ("layer broken.py:two_outputs", "writes exactly one Role.OUTPUT tensor, which the next node reads; "
                                    "it has 2 (y, z)"),
    ("layer layers.py:swish K=3", "K is neither a keyword of the function nor a size or constant"),
    ("layer layers.py:average_pooling S=two", "'two' is not a number"),
    ("layer layers.py:average_pooling S=0", "size S must be a positive integer, got 0"),
    ("layer layers.py:average_pooling S", "'S' is not NAME=VALUE"),
])
def test_a_mistake_is_one_line_naming_the_model_file_and_line(model_dir, line, words):
    (model_dir / "broken.py").write_text(BROKEN)
    (model_dir / "syntax.py").write_text("x = 1\ny = = 2\n")
    (model_dir / "crash.py").write_text("import math\n\nratio = 1 / 0\n")
    path = _model_with(model_dir, line)
    with pytest.raises(VggenError) as e:
        load_model(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}, line 2: ") and "\n" not in message, message
    assert words in message, message


@pytest.mark.parametrize("line, words", [
    ("layer layers.py:average_pooling S=3", "layers.py:average_pooling does not fit its input "
                                            "(B, 1, 32, 32): layer AveragePooling: x dimension 2 (HO*S) "
                                            "has 32 elements, which HO*S is for no positive integer HO"),
    ("layer layers.py:average_pooling", "the input (B, 1, 32, 32) does not tell HO, S, WO of "
                                        "layers.py:average_pooling: give what fixes them on the line as "
                                        "NAME=VALUE (S=...)"),
    ("layer broken.py:bad_initialiser", "initialise_bad_initialiser of broken.py: s must be a finite array "
                                        "of shape (1024,), got shape (2,)"),
])
def test_sizes_and_parameters_that_do_not_fit_are_one_line(model_dir, line, words):
    (model_dir / "broken.py").write_text(BROKEN)
    path = _model_with(model_dir, line)
    with pytest.raises(VggenError) as e:
        Network("numpy", width=1, model=str(path))
    message = str(e.value)
    assert message.startswith(f"{path}, line 2: ") and "\n" not in message, message
    assert words in message, message


def test_a_checkpoint_header_with_bad_layer_file_hashes_is_refused(tmp_path):
    path = tmp_path / "checkpoint.npz"
    header = {"config": {}, "epoch": 1, "rng": np.random.default_rng(0).bit_generator.state,
              "layer_files": {"layers.py": "not a hash"}}
    ones = {"w": np.ones(2, np.float32)}
    ckpt.save(path, header, ones, ones, {})
    with pytest.raises(VggenError, match="header field 'layer_files' must map each layer file to the "
                                         "SHA-256 of its bytes"):
        ckpt.load(path)


def test_a_mistake_stops_vggen_train_before_work(model_dir):
    path = _model_with(model_dir, "layer layers.py:average_pooling S=3")
    one_line_error(vggen("train", "--target", "c", "--model", path, "--width", "1", "--epochs", "1"),
                   f"{path}, line 2:", "does not fit its input")
    path = _model_with(model_dir, "layer layers.py:mish")
    one_line_error(vggen("train", "--target", "c", "--model", path), f"{path}, line 2:", "no function 'mish'")
