"""Damaged inputs given to the command line: one line naming the problem, nothing changed.

Checkpoints given to ``vggen train --resume``, CIFAR-10 batches given to
``vggen train --dataset cifar10`` and metrics files given to ``vggen plot``.
Each refused case asserts exit status 2, exactly one line on stderr naming the
file (and the field, array or line), no traceback, and that the user's file
is byte for byte as it was.  A positive control per group shows that the
refusals come from the damage and not from the way the files were written."""

from __future__ import annotations

import json
import math
import shutil
import time

import numpy as np
import pytest

from tests.faults.cli import TINY, digest, one_line_error, vggen
from vggen.data.datasets import BIN_DIR, RECORD

# An epoch of TINY takes about 1.5 s on one thread, but 10-30x longer when the
# OpenMP threads share two cores with other test processes: the runs that must
# train are pinned to one thread so the module stays fast on a busy machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint after 1 epoch of a 3-epoch schedule: header and arrays."""
    directory = tmp_path_factory.mktemp("trained")
    res = vggen("train", *TINY, "--epochs", "1", "--schedule-epochs", "3",
                "--checkpoint", directory, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    with np.load(directory / "checkpoint.npz") as z:
        arrays = {name: z[name] for name in z.files}
    return directory, arrays


def header_of(arrays: dict) -> dict:
    return json.loads(arrays["header"].tobytes().decode("utf-8"))


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def write_checkpoint(directory, arrays: dict):
    """The arrays as ``directory/checkpoint.npz``, as ``save`` lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "checkpoint.npz"
    np.savez(path, **arrays)
    return path


def with_header(arrays: dict, change) -> dict:
    """A copy whose header is ``change(header)`` (a dict, or raw text if a str)."""
    new = change(header_of(arrays))
    return {**arrays, "header": encode(new if isinstance(new, str) else json.dumps(new))}


def edit(**fields):
    return lambda h: {**h, **fields}


def drop(key):
    return lambda h: {k: v for k, v in h.items() if k != key}


def edit_config(**fields):
    return lambda h: {**h, "config": {**h["config"], **fields}}


def bad_rng(h):
    state = json.loads(json.dumps(h["rng"]))
    state["state"]["state"] = 1.5          # numpy would truncate it to 1 without a word
    return {**h, "rng": state}


HEADERS = {
    "not-json": (lambda h: json.dumps(h)[:-5], ["header is not JSON"]),
    "json-list": (lambda h: [h], ["header is a JSON list"]),
    "no-format": (drop("format"), ["not a vggen checkpoint", "no 'format'"]),
    "other-format": (edit(format="npz"), ["not a vggen checkpoint", "'format'"]),
    "version-2": (edit(version=2), ["format version 2", "'version'"]),
    "epoch-string": (edit(epoch="x"), ["'epoch'", "'x'"]),
    "epoch-negative": (edit(epoch=-1), ["'epoch'", "-1"]),
    "epoch-bool": (edit(epoch=True), ["'epoch'", "True"]),
    "config-list": (edit(config=[1, 2]), ["'config'", "must be an object"]),
    "lr-string": (edit_config(lr="0.01"), ["'config.lr'", "finite number"]),
    "no-rng": (drop("rng"), ["no 'rng'"]),
    "rng-float-state": (bad_rng, ["'rng'", "not a valid PCG64 state"]),
    "rng-unknown": (edit(rng={"bit_generator": "Nope", "state": {}}), ["'rng'", "'Nope'"]),
    "history-dict": (edit(history={"epoch": 1}), ["'history'", "must be a list"]),
    "accumulate-zero": (edit_config(accumulate=0), ["'config.accumulate'", "integer ≥ 1"]),
    "ranks-string": (edit(ranks="2"), ["'ranks'", "integer ≥ 1"]),
}


def refuse_resume(path, *words):
    """Resume from ``path``: one line naming it and ``words``, quickly, file unchanged."""
    before = digest(path)
    t0 = time.perf_counter()
    res = vggen("train", *TINY, "--resume", path, "--epochs", "2")
    elapsed = time.perf_counter() - t0
    one_line_error(res, str(path), *words)
    assert elapsed < 20, elapsed                 # refused before any data or epoch
    assert digest(path) == before


@pytest.mark.parametrize("case", list(HEADERS))
def test_a_malformed_header_is_refused(trained, tmp_path, case):
    change, words = HEADERS[case]
    path = write_checkpoint(tmp_path / "ck", with_header(trained[1], change))
    refuse_resume(path, *words)


def nan_in(arrays):
    a = arrays["param/bn1.gamma"].copy()
    a[1] = np.nan
    return {**arrays, "param/bn1.gamma": a}


def int_param(arrays):
    return {**arrays, "param/conv1.w": arrays["param/conv1.w"].astype(np.int32)}


def no_momentum(arrays):
    return {k: v for k, v in arrays.items() if k != "momentum/fc2.w"}


def header_as_floats(arrays):
    return {**arrays, "header": arrays["header"].astype(np.float32)}


@pytest.mark.parametrize("change, words", [
    (nan_in, ["param/bn1.gamma", "1 non-finite value"]),
    (int_param, ["param/conv1.w", "int32"]),
    (no_momentum, ["param/fc2.w has no momentum/fc2.w"]),
    (header_as_floats, ["header is not UTF-8 text", "float32"]),
], ids=["nan", "int-param", "no-momentum", "float-header"])
def test_a_bad_array_is_refused(trained, tmp_path, change, words):
    path = write_checkpoint(tmp_path / "ck", change(trained[1]))
    refuse_resume(path, *words)


def test_the_readable_sidecar_points_to_the_npz(trained, tmp_path):
    copy = tmp_path / "ck"
    shutil.copytree(trained[0], copy)
    sidecar = copy / "checkpoint.json"
    before = digest(copy / "checkpoint.npz")
    refuse_resume(sidecar, "readable copy", str(copy / "checkpoint.npz"))
    assert digest(copy / "checkpoint.npz") == before


def test_a_text_file_named_npz(tmp_path):
    path = tmp_path / "x.npz"
    path.write_text("these are my notes\n")
    refuse_resume(path, "not an .npz archive")


def test_an_empty_file(tmp_path):
    path = tmp_path / "checkpoint.npz"
    path.touch()
    refuse_resume(path, "empty")


def test_a_truncated_npz(trained, tmp_path):
    whole = (trained[0] / "checkpoint.npz").read_bytes()
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(whole[:len(whole) // 2])
    refuse_resume(path, "damaged or truncated")


def test_the_untouched_copy_resumes(trained, tmp_path):
    """The control: written the same way, unchanged, it resumes and trains epoch 2."""
    path = write_checkpoint(tmp_path / "ck", trained[1])
    res = vggen("train", *TINY, "--resume", path, "--epochs", "2", env=ONE_THREAD)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    with np.load(path) as z:
        assert header_of({"header": z["header"]})["epoch"] == 2


# --------------------------------------------------------------------------- CIFAR-10

SUBSET = "VGGEN_CIFAR_SUBSET"
RECORDS = 70              # per batch file: far from the official 10,000
FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar(root):
    """Binary batches of RECORDS records: 1 label byte, then 3072 channel-major pixels."""
    rng = np.random.default_rng(0)
    d = root / BIN_DIR
    d.mkdir(parents=True)
    for name in FILES:
        labels = rng.integers(0, 10, size=(RECORDS, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(RECORDS, RECORD - 1), dtype=np.uint8)
        (d / f"{name}.bin").write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())
    return d


def digests(d):
    return {p.name: digest(p) for p in sorted(d.iterdir())}


def cifar_train(root, **env):
    return vggen("train", "--dataset", "cifar10", "--data", root, *TINY, "--epochs", "1", env=env)


def test_a_small_cifar_batch_needs_the_subset_variable(tmp_path, monkeypatch):
    # vggen() passes this process's environment on: the variable must not leak in.
    monkeypatch.delenv(SUBSET, raising=False)
    d = write_cifar(tmp_path)
    before = digests(d)
    one_line_error(cifar_train(tmp_path), str(d / "data_batch_1.bin"), f"{RECORDS} records",
                   "10000", f"{SUBSET}=1")
    assert digests(d) == before
    res = cifar_train(tmp_path, **{SUBSET: "1"}, **ONE_THREAD)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert digests(d) == before


@pytest.mark.parametrize("subset", [None, "1"], ids=["strict", "subset"])
def test_a_cifar_file_cut_mid_record(tmp_path, monkeypatch, subset):
    monkeypatch.delenv(SUBSET, raising=False)
    d = write_cifar(tmp_path)
    cut = d / "data_batch_1.bin"          # read first: no other refusal comes before it
    cut.write_bytes(cut.read_bytes()[:-RECORD // 2])
    before = digests(d)
    env = {SUBSET: subset} if subset else {}
    one_line_error(cifar_train(tmp_path, **env), str(cut), "not a whole number",
                   f"{RECORD}-byte records")
    assert digests(d) == before


# --------------------------------------------------------------------------- plot


def row(epoch, loss=1.0, acc=0.5, **more):
    return {"epoch": epoch, "train_loss": loss, "train_acc": acc, "test_loss": loss,
            "test_acc": acc, "images_per_s": 1000.0, "seconds": 1.5, **more}


def lines(*rows) -> str:
    # json.dumps writes NaN and Infinity as the bare words a Python writer produces.
    return "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows)


NAN, INF = math.nan, math.inf
ALL_NAN = {"train_loss": NAN, "train_acc": NAN, "test_loss": NAN, "test_acc": NAN,
           "images_per_s": NAN, "seconds": NAN}

# name: (file text, None for a PNG drawn or words of its one error line,
#        words of the one warning line a drawn PNG comes with, or None for none)
PLOTS = {
    "huge": (lines(row(1, 1e308, 1e308), row(2, 1.0), row(3, 0.5)), None,
             ["drew 4 values beyond ±1e+300"]),
    "huge-accuracy": (lines(row(1, 1.0, 1e308), row(2, 0.5)), None,
                      ["drew 2 values beyond ±1e+300"]),
    "huge-negative": (lines(row(1, -1e308, -1e308), row(2, 1.0)), None,
                      ["drew 4 values beyond ±1e+300"]),
    "huge-integer": (lines(row(1, 10 ** 400), row(2, 1.0)), None,
                     ["skipped 2 NaN or infinite values"]),
    "huge-integer-epoch": (lines(row(10 ** 400)), ["line 1", "epoch must be a whole number"],
                           None),
    "inf-nan": (lines(row(1, INF, NAN), row(2, -INF, 0.5), row(3, 0.5, INF)), None,
                ["skipped 8 NaN or infinite values"]),
    "single-row": (lines(row(1)), None, None),
    "negative-loss": (lines(row(1, -2.0), row(2, -3.0)), None, None),
    "steep-loss": (lines(row(1, 1e4), row(2, 1e-2)), None, None),
    "an-epoch-all-nan": (lines(row(1), {"epoch": 2, **ALL_NAN}, row(3)), None,
                         ["skipped 4 NaN or infinite values"]),
    "resumed": (lines(row(1), row(2), row(3), row(2), row(3)), None, None),
    "every-value-nan": (lines({"epoch": 1, **ALL_NAN}, {"epoch": 2, **ALL_NAN}),
                        ["nothing to plot"], None),
    "interleaved": (lines(*(row(e) for e in (1, 1, 2, 2, 3, 3))),
                    ["line 2", "mixes runs"], None),
    "garbage-line": (lines(row(1), "{oops\n", row(2)), ["line 2", "not JSON"], None),
    "not-an-object": (lines(row(1), "[1, 2]\n"), ["line 2", "expected a JSON object"], None),
    "string-loss": (lines(row(1, "low")), ["line 1", "train_loss must be a number"], None),
    "epoch-fraction": (lines(row(1.5)), ["line 1", "epoch must be a whole number"], None),
    "empty": ("\n\n", ["empty"], None),
}


@pytest.mark.parametrize("text, error, warning", PLOTS.values(), ids=PLOTS.keys())
def test_plot_draws_or_refuses_in_one_line(tmp_path, text, error, warning):
    pytest.importorskip("matplotlib")
    metrics, out = tmp_path / "m.jsonl", tmp_path / "out.png"
    metrics.write_text(text)
    before = digest(metrics)
    res = vggen("plot", metrics, "-o", out)
    if error is not None:
        one_line_error(res, str(metrics), *error)
        assert not out.exists()
    else:
        assert res.returncode == 0, res.stderr
        assert out.read_bytes().startswith(b"\x89PNG")
        if warning is None:
            assert res.stderr == "", res.stderr
        else:
            one_line_error(res, str(metrics), *warning, status=0)
    assert digest(metrics) == before
