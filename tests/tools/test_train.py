"""Training: config validation, the optimizer and schedule, metrics, checkpoints,
exact resume, and a diverging run that stops with its last checkpoint whole.

Runs use the C kernels at width 4 on a small slice of the digits set."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

import vggen.runtime as backends
import vggen.tools.train as T
from vggen.data.datasets import Dataset, load_digits32
from vggen.errors import VggenError
from vggen.model import checkpoint as ckpt
from vggen.tools.train import SGD, TrainConfig, learning_rate, train

KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s", "seconds"}


@pytest.fixture(scope="module")
def small_digits():
    train_set, test_set = load_digits32(seed=0)
    return (Dataset(train_set.images[:160].copy(), train_set.labels[:160].copy(), "digits-train"),
            Dataset(test_set.images[:40].copy(), test_set.labels[:40].copy(), "digits-test"))


@pytest.fixture
def env(monkeypatch, c_backend, small_digits):
    """train() on the small slice, with the test's C backend."""
    monkeypatch.setattr(T, "load_dataset", lambda name, data, seed: small_digits)
    monkeypatch.setitem(backends._BACKENDS, "c", c_backend)


def config(tmp_path=None, **kw) -> TrainConfig:
    base = dict(target="c", dataset="digits", epochs=2, batch_size=32, width=4, seed=0,
                lr=0.05, progress=False)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kw, message", [
    ({"epochs": -1}, "--epochs must be an integer ≥ 0"),
    ({"batch_size": 0}, "--batch-size must be an integer ≥ 1"),
    ({"batch_size": 161}, "--batch-size 161 is larger than the training set"),
    ({"target": "tpu"}, "unknown target 'tpu'"),
    ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
    ({"momentum": 1.0}, r"--momentum must be in \[0, 1\)"),
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"width": 0}, "--width must be an integer ≥ 1"),
    ({"accumulate": 0}, "--accumulate must be an integer ≥ 1"),
    ({"check_every": 0}, "--check-every must be an integer ≥ 1"),
    ({"batch_size": 96, "accumulate": 2}, "the global batch, 1 rank × --accumulate 2 × --batch-size 96 = "
                                          "192 images, is larger than the training set"),
    ({"cuda_graph": True, "accumulate": 2}, "--cuda-graph with --accumulate is not supported yet"),
])
def test_bad_configs(env, kw, message):
    with pytest.raises(VggenError, match=message):
        train(config(**kw))


def test_config_fields_match_the_cli():
    names = set(TrainConfig.__dataclass_fields__)
    assert {"target", "dataset", "data", "epochs", "batch_size", "lr", "momentum", "weight_decay",
            "width", "seed", "metrics", "checkpoint", "resume", "dropout", "augment"} <= names
    d = TrainConfig()
    assert (d.momentum, d.weight_decay, d.dropout, d.augment) == (0.9, 5e-4, None, True)


def test_dropout_defaults_to_the_networks_ratios_on_cifar10_only():
    from vggen.tools.train import use_dropout
    assert use_dropout(TrainConfig(dataset="cifar10"))
    assert not use_dropout(TrainConfig(dataset="digits"))
    assert use_dropout(TrainConfig(dataset="digits", dropout=True))
    assert not use_dropout(TrainConfig(dataset="cifar10", dropout=False))


# --------------------------------------------------------------------------- pieces


def test_cosine_schedule():
    assert learning_rate(0.1, 0, 100) == 0.1
    assert learning_rate(0.1, 50, 100) == pytest.approx(0.05)
    assert learning_rate(0.1, 100, 100) == pytest.approx(0.0, abs=1e-12)
    steps = [learning_rate(0.1, t, 100) for t in range(101)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_sgd_momentum_and_weight_decay():
    be = backends.get_backend("numpy")
    p = {"w": np.array([1.0, -2.0], np.float32)}
    g = {"w": np.array([0.5, 0.5], np.float32)}
    opt = SGD(p, g, be, momentum=0.9, weight_decay=0.1)
    opt.step(0.1)                          # v = g + λp; p -= η v
    np.testing.assert_allclose(p["w"], [1 - 0.1 * 0.6, -2 - 0.1 * 0.3], rtol=1e-6)
    v1 = np.array([0.6, 0.3])
    g["w"][...] = 0.5
    w1 = p["w"].astype(np.float64)
    opt.step(0.1)
    v2 = 0.9 * v1 + 0.5 + 0.1 * w1
    np.testing.assert_allclose(p["w"], w1 - 0.1 * v2, rtol=1e-6)
    plain = SGD({"w": np.ones(2, np.float32)}, {"w": np.full(2, 2.0, np.float32)}, be, 0.0, 0.0)
    plain.step(0.25)
    np.testing.assert_array_equal(plain.params["w"], [0.5, 0.5])


def test_digits_are_cropped_but_never_flipped(env, monkeypatch):
    seen = []
    real = T.draw_crops

    def spy(n, rng, pad=4, flip=True):
        seen.append((pad, flip))
        return real(n, rng, pad=pad, flip=flip)

    monkeypatch.setattr(T, "draw_crops", spy)
    train(config(epochs=1))
    assert seen and set(seen) == {(4, False)}
    seen.clear()
    train(config(epochs=1, augment=False))
    assert seen == []


# --------------------------------------------------------------------------- runs


def test_training_writes_metrics_and_checkpoint(env, tmp_path):
    metrics = tmp_path / "m.jsonl"
    rows = train(config(epochs=2, metrics=str(metrics), checkpoint=str(tmp_path / "ck")))
    assert [r["epoch"] for r in rows] == [1, 2]
    lines = [json.loads(s) for s in metrics.read_text().splitlines()]
    assert lines == rows
    for r in rows:
        assert set(r) == KEYS
        assert math.isfinite(r["train_loss"]) and 0 <= r["test_acc"] <= 1 and r["images_per_s"] > 0
    c = ckpt.load(tmp_path / "ck" / "checkpoint.npz")
    assert c.epoch == 2 and c.header["config"]["width"] == 4 and len(c.header["history"]) == 2
    assert set(c.params) == set(c.momentum) and len(c.params) == 43
    assert len(c.state) == 28
    assert json.loads((tmp_path / "ck" / "checkpoint.json").read_text())["epoch"] == 2
    assert not [f for f in (tmp_path / "ck").iterdir() if f.name.startswith(".")]


def test_zero_epochs_trains_nothing(env):
    assert train(config(epochs=0)) == []


def test_resume_continues_exactly(env, tmp_path, monkeypatch):
    whole = train(config(epochs=3, checkpoint=str(tmp_path / "a")))

    real_save = ckpt.save

    def save_then_die(*args, **kw):      # the run is killed right after its first checkpoint
        real_save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config(epochs=3, checkpoint=str(tmp_path / "b"), metrics=str(tmp_path / "m")))
    monkeypatch.setattr(ckpt, "save", real_save)
    # killed between the checkpoint and its metrics row: the row is not there yet
    assert (tmp_path / "m").read_text() == ""
    first = ckpt.load(tmp_path / "b").header["history"]
    # resumed with no options repeated: the checkpoint's are the run's
    rest = train(TrainConfig(resume=str(tmp_path / "b" / "checkpoint.npz"), progress=False))
    assert [r["epoch"] for r in first + rest] == [1, 2, 3]
    for a, b in zip(whole, first + rest):
        for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[k] == b[k], (k, a, b)
    rows = [json.loads(s) for s in (tmp_path / "m").read_text().splitlines()]
    assert rows == first + rest          # the lost row restored from the checkpoint's history
    pa = ckpt.load(tmp_path / "a").params
    pb = ckpt.load(tmp_path / "b").params
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_two_plus_one_epochs_equal_three(env, tmp_path):
    whole = train(config(epochs=3))
    train(config(epochs=2, schedule_epochs=3, checkpoint=str(tmp_path)))
    rest = train(config(epochs=3, resume=str(tmp_path)))
    assert [r["train_loss"] for r in rest] == [whole[2]["train_loss"]]
    assert rest[0]["test_loss"] == whole[2]["test_loss"]


@pytest.mark.parametrize("kw, words", [
    ({"width": 8}, "--width 4; a resumed run keeps it (got --width 8)"),
    ({"lr": 0.5}, "--lr 0.05; a resumed run keeps it"),
    ({"batch_size": 16}, "--batch-size 32"),
    ({"momentum": 0.5}, "--momentum 0.9"),
    ({"augment": False}, "trained with augmentation"),
    ({"accumulate": 2}, "--accumulate 1; a resumed run keeps it (got --accumulate 2)"),
    ({"epochs": 3}, "goes past the learning-rate schedule"),
])
def test_resume_refuses_a_changed_run(env, tmp_path, kw, words):
    train(config(epochs=1, checkpoint=str(tmp_path)))
    before = (tmp_path / "checkpoint.npz").read_bytes()
    with pytest.raises(VggenError, match=re.escape(words)):
        train(config(**{"epochs": 2, **kw}, resume=str(tmp_path / "checkpoint.npz")))
    assert (tmp_path / "checkpoint.npz").read_bytes() == before


def test_accumulated_micro_batches_resume_exactly(env, tmp_path):
    whole = train(config(epochs=2, batch_size=16, accumulate=2))
    train(config(epochs=1, schedule_epochs=2, batch_size=16, accumulate=2, checkpoint=str(tmp_path)))
    header = ckpt.load(tmp_path).header
    assert (header["ranks"], header["config"]["accumulate"]) == (1, 2)
    rest = train(config(epochs=2, resume=str(tmp_path)))              # --accumulate 2 carried over
    assert [r["epoch"] for r in rest] == [2]
    for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert rest[0][k] == whole[1][k], k


def test_resume_may_extend_with_a_new_schedule(env, tmp_path):
    train(config(epochs=1, checkpoint=str(tmp_path)))
    rows = train(config(epochs=2, schedule_epochs=4, resume=str(tmp_path)))
    assert [r["epoch"] for r in rows] == [2]
    assert ckpt.load(tmp_path).header["config"]["schedule_epochs"] == 4


def test_a_fresh_run_never_overwrites_a_checkpoint_or_metrics(env, tmp_path):
    train(config(epochs=1, checkpoint=str(tmp_path), metrics=str(tmp_path / "m.jsonl")))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(VggenError, match="already holds a checkpoint of another run"):
        train(config(epochs=1, checkpoint=str(tmp_path)))
    with pytest.raises(VggenError, match="already holds 1 epoch rows of another run"):
        train(config(epochs=1, metrics=str(tmp_path / "m.jsonl")))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_divergence_stops_and_keeps_the_last_checkpoint(env, tmp_path, monkeypatch):
    train(config(epochs=1, schedule_epochs=3, checkpoint=str(tmp_path)))
    path = tmp_path / "checkpoint.npz"
    before = path.read_bytes()
    monkeypatch.setattr(T, "learning_rate", lambda base, step, total: 1e30)
    with pytest.raises(VggenError, match=r"training stopped .*(loss is|no longer finite).*"
                                         r"last good checkpoint is .*checkpoint.npz \(epoch 1\)"):
        train(config(epochs=3, resume=str(path)))
    assert path.read_bytes() == before
    assert ckpt.load(path).epoch == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint.json", "checkpoint.npz"]


# --------------------------------------------------------------------------- checkpoint files


def test_checkpoint_roundtrip_and_bad_files(tmp_path):
    params = {"conv1.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    rng = np.random.default_rng(7).bit_generator.state          # 128-bit integers inside
    header = {"config": {"width": 4}, "epoch": 3, "rng": rng}
    path = ckpt.save(tmp_path / "c.npz", header, params, {"conv1.w": params["conv1.w"] * 2},
                     {"bn1.running_mean": np.ones(3, np.float32)})
    c = ckpt.load(path)
    assert c.epoch == 3 and c.header["rng"] == rng
    np.testing.assert_array_equal(c.momentum["conv1.w"], params["conv1.w"] * 2)
    assert c.state["bn1.running_mean"].tolist() == [1, 1, 1]
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(VggenError, match="cannot read checkpoint .*junk.npz"):
        ckpt.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(VggenError, match="not a vggen checkpoint"):
        ckpt.load(tmp_path / "other.npz")
    with pytest.raises(VggenError, match="does not exist"):
        ckpt.load(tmp_path / "missing.npz")
