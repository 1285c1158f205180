"""Bad input and faults: one clear line on stderr, a non-zero exit, no traceback."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


def vggen(*args, env=None):
    return subprocess.run([sys.executable, "-m", "vggen", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("args, words", [
    (["train", "--target", "tpu"], "invalid choice: 'tpu'"),
    (["train", "--epochs", "-1"], "--epochs"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--batch-size", "100000"], "larger than the training set"),
    (["train", "--width", "0"], "--width"),
    (["train", "--resume", "/nonexistent/checkpoint.npz"], "does not exist"),
    (["train", "--dataset", "cifar10", "--data", "/nonexistent"], "vggen data fetch cifar10"),
    (["inspect", "nosuch"], "no layer named 'nosuch'"),
    (["plot", "/nonexistent.jsonl"], "no such metrics file"),
    (["bogus"], "invalid choice: 'bogus'"),
])
def test_bad_input_is_one_line(args, words):
    res = vggen(*args)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], res.stderr


def test_missing_compiler_is_one_line(tmp_path):
    res = vggen("train", "--target", "c", "--epochs", "1", "--width", "2",
                env={"CC": "/nonexistent/cc", "XDG_CACHE_HOME": str(tmp_path)})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no C compiler" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_interrupted_training_leaves_a_resumable_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "vggen", "train", "--target", "c", "--width", "2", "--epochs", "50",
           "--batch-size", "64", "--checkpoint", str(ck)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (ck / "checkpoint.npz").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (ck / "checkpoint.npz").exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    with np.load(ck / "checkpoint.npz") as data:       # whole, not half-written
        assert len(data.files) > 0
    res = vggen("train", "--target", "c", "--width", "2", "--epochs", "1", "--batch-size", "64",
                "--resume", str(ck / "checkpoint.npz"))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr


def test_wrong_image_size_is_a_clear_error():
    from vggen.errors import VggenError
    from vggen.model.network import build_nodes

    with pytest.raises(VggenError, match="multiple of 32"):
        build_nodes(4, image_shape=(3, 30, 30))
