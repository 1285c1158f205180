"""Networks as data: the shipped models, the model file format and its errors."""

from __future__ import annotations

import pytest

from tests.faults.cli import TINY, one_line_error, vggen
from vggen.errors import VggenError
from vggen.model.architecture import MODELS, load_model, parse_model
from vggen.model.network import build_nodes

# The seed's network (shared/vgg-network.md), written out: the default model must stay it.
SEED = (
    ("block", 1), ("dropout", 0.3), ("block", 1), ("pool", None),
    ("block", 2), ("dropout", 0.4), ("block", 2), ("pool", None),
    ("block", 4), ("dropout", 0.4), ("block", 4), ("dropout", 0.4), ("block", 4), ("pool", None),
    ("block", 8), ("dropout", 0.4), ("block", 8), ("dropout", 0.4), ("block", 8), ("pool", None),
    ("block", 8), ("dropout", 0.4), ("block", 8), ("dropout", 0.4), ("block", 8), ("pool", None),
    ("dropout", 0.5), ("linear", 8), ("bn", None), ("relu", None), ("dropout", 0.5),
    ("linear", "classes"), ("loss", None),
)


def test_the_default_is_the_seed_network():
    assert MODELS["vgg"] == SEED


@pytest.mark.parametrize("name, convolutions", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13),
                                                ("vgg19", 16)])
def test_the_vgg_configurations(name, convolutions):
    nodes = build_nodes(4, model=name)
    assert sum(n.kind == "conv" for n in nodes) == convolutions
    assert sum(n.kind == "pool" for n in nodes) == 5
    assert [n.kind for n in nodes if n.kind == "dropout"] == ["dropout"] * 2     # the head's only
    widths = [n.sizes["OC"] for n in nodes if n.kind == "conv"]
    assert widths == sorted(widths) and set(widths) == {4, 8, 16, 32}
    assert nodes[-1].kind == "loss"


def test_vgg16_is_the_seed_without_dropout_between_convolutions():
    plain = [e for e in SEED if not (e[0] == "dropout" and e[1] < 0.5)]
    assert MODELS["vgg16"] == tuple(plain)


SMALL = """
# a small model: two stages, then the classifier
block 1
pool        # 16×16
conv 2
bn
relu
pool
linear 4
relu
dropout 0.25
linear classes
loss
"""


def test_a_model_file(tmp_path):
    model = parse_model(SMALL, "small.vgg")
    assert model.entries[:3] == (("block", 1), ("pool", None), ("conv", 2))
    nodes = build_nodes(3, model=model)
    assert [n.kind for n in nodes] == ["conv", "bn", "relu", "pool", "conv", "bn", "relu", "pool",
                                       "linear", "relu", "dropout", "linear", "loss"]
    assert nodes[8].sizes == {"IC": 6 * 8 * 8, "C": 12}          # flattens (C, H, W)


@pytest.mark.parametrize("text, words", [
    ("block 1\nmaxpool\nloss", "line 2: unknown entry 'maxpool'"),
    ("block x\nlinear classes\nloss", "line 1: block needs a positive whole multiple of --width"),
    ("block 0\nlinear classes\nloss", "line 1: block needs a positive"),
    ("pool 2\nlinear classes\nloss", "line 1: pool takes no argument"),
    ("dropout 1.5\nlinear classes\nloss", "line 1: the dropout ratio must be a number 0 ≤ P < 1"),
    ("dropout\nlinear classes\nloss", "line 1: dropout takes one argument"),
    ("block 1\nlinear classes", "a model ends with `loss`"),
    ("loss\nlinear classes\nloss", "line 1: `loss` must be the last entry"),
    ("block 1\nlinear 2\nloss", "no `linear classes`"),
    ("", "a model ends with `loss`"),
])
def test_model_file_mistakes(text, words):
    with pytest.raises(VggenError, match="^m.vgg") as e:
        parse_model(text, "m.vgg")
    assert words in str(e.value)


def test_too_many_poolings_for_the_images():
    model = parse_model("pool\n" * 6 + "linear classes\nloss", "six.vgg")
    with pytest.raises(VggenError, match="multiple of 64×64 for the 6 2×2 poolings of model six.vgg"):
        build_nodes(2, model=model)


def test_unknown_model():
    with pytest.raises(VggenError, match="neither a shipped model .*vgg19.* nor a model file"):
        load_model("resnet50")


def test_train_a_model_file_and_refuse_another_on_resume(tmp_path):
    model = tmp_path / "small.vgg"
    model.write_text(SMALL)
    res = vggen("train", *TINY, "--epochs", "1", "--schedule-epochs", "2", "--model", model,
                "--checkpoint", tmp_path / "ck")
    assert res.returncode == 0, res.stderr
    one_line_error(vggen("train", "--resume", tmp_path / "ck", "--epochs", "2", "--model", "vgg11"),
                   "was trained with --model", "(got --model vgg11)")
    res = vggen("train", "-q", "--resume", tmp_path / "ck", "--epochs", "2")
    assert res.returncode == 0, res.stderr


def test_a_bad_model_file_is_one_line_before_work(tmp_path):
    model = tmp_path / "bad.vgg"
    model.write_text("block 1\nmaxpool\nlinear classes\nloss\n")
    one_line_error(vggen("train", *TINY, "--model", model), f"{model}, line 2: unknown entry")
