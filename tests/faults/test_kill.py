"""``kill -9`` at random points: checkpoints stay whole, metrics agree with them,
and what a dead writer left behind is cleaned up by the next one."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from vggen.model import checkpoint as ckpt
from tests.faults.cli import TINY, vggen

# Saves checkpoints of ~16 MB in a loop, each array filled with its epoch, and
# prints the epoch once the save has returned.
WRITER = """
import sys
import numpy as np
from vggen.model import checkpoint as ckpt
rng = np.random.default_rng(0).bit_generator.state
for epoch in range(1, 10**6):
    w = np.full(2_000_000, epoch, np.float32)
    ckpt.save(sys.argv[1], {"config": {"width": 2, "seed": 0}, "epoch": epoch, "rng": rng},
              {"w": w}, {"w": w}, {})
    print(epoch, flush=True)
"""


@pytest.mark.parametrize("seed", range(5))
def test_kill_during_a_checkpoint_write(tmp_path, seed):
    path = tmp_path / "checkpoint.npz"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True)
    first = proc.stdout.readline()                      # one save is complete
    assert first.strip() == "1"
    time.sleep(random.Random(seed).uniform(0.0, 0.6))   # then somewhere inside a later one
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = int([first, *proc.stdout.read().split()][-1])
    proc.stdout.close()

    saved = ckpt.load(path)                             # whole: the last one, or the one before
    assert saved.epoch in (done, done + 1)
    assert (saved.params["w"] == saved.epoch).all() and (saved.momentum["w"] == saved.epoch).all()

    ckpt.save(path, saved.header, saved.params, saved.momentum, saved.state)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint.json", "checkpoint.npz"], left   # the dead writer's temporaries: gone


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("seed", range(2))
def test_kill_during_training_then_resume(tmp_path, seed):
    """Killed anywhere in epochs 2-3 of 4, resumed: the metrics file holds each
    epoch once, in order, equal to the checkpoint's history."""
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "vggen", "train", *TINY, "--epochs", "4",
           "--checkpoint", str(ck), "--metrics", str(metrics)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (ck / "checkpoint.npz").exists():
            break
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 4.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()

    res = vggen("train", "-q", "--resume", ck)           # the checkpoint's options are the run's
    assert res.returncode == 0, res.stderr
    rows = _rows(metrics)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows == ckpt.load(ck).header["history"]


def test_two_runs_on_one_metrics_file(tmp_path):
    metrics = tmp_path / "m.jsonl"
    first = subprocess.Popen([sys.executable, "-m", "vggen", "train", *TINY, "--epochs", "50",
                              "--metrics", str(metrics)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not metrics.exists() and time.time() < deadline:
            time.sleep(0.05)
        res = vggen("train", *TINY, "--epochs", "1", "--metrics", metrics)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines() == [
            f"vggen: error: --metrics {metrics} is being written by another vggen train; "
            f"wait for it, or name another file"]
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    rows = _rows(metrics)
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))   # one run's rows only
