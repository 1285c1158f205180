"""Data-parallel training under ``mpiexec -n 2`` (oversubscribed on two cores), through
the command line (tests/distributed/driver.py: small synthetic data, a record per step).

What is shown:

* two ranks train exactly as one process with ``--accumulate 2``: the losses, the
  correct counts and a hash of parameters, velocities and BN statistics after every
  step, the epoch's metrics (the sharded evaluation included) and the checkpoint are
  equal bit for bit — tolerance 0: the sum of two gradients is the same in either
  order, and the C kernels give the same bits whatever the thread count;
* the two ranks hold the same state bit for bit after every step (and check it
  themselves, ``--check-every 1``);
* rank 0 alone writes the metrics and the checkpoint; a run resumes on the same
  number of ranks, and equals the run never stopped; another number is refused;
* ranks started with different options or different kernels are refused with one line;
* a rank that raises, hangs or is killed ends the job within 60 s, never a hang.

Skipped without mpiexec or mpi4py (``pip install -e '.[mpi]'``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO
from vggen.model import checkpoint as ckpt

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install -e '.[mpi]')")


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"      # the one pip installed with mpi4py's MPI
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install -e '.[mpi]')")

RUN = ("train", "--target", "c", "--width", "2", "--batch-size", "16", "-q")
DRIVER = (sys.executable, "-m", "tests.distributed.driver")
VGGEN = (sys.executable, "-m", "vggen")
# One OpenMP thread a process: two ranks on two cores, and the one-process twin alike.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("DRIVER_FAULT", None)


def run(command, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=REPO, capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def ranks(n, *command):
    return (MPIEXEC, "-n", str(n), *command)


def records(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]


def rows(path: Path) -> list[dict]:
    timing = ("images_per_s", "seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def compiled():
    """The C kernels compiled into the default cache once, before ranks start together."""
    from vggen.runtime.c import CBackend
    CBackend(generated=REPO / "generated")


@pytest.fixture(scope="module")
def runs(compiled, tmp_path_factory):
    """Two ranks: epoch 1 of a 2-epoch schedule, then resumed to epoch 2; one
    process with --accumulate 2: both epochs at once."""
    root = tmp_path_factory.mktemp("mpi")
    two, one = root / "two", root / "one"
    started = time.monotonic()
    res = run(ranks(2, *DRIVER, two, *RUN, "--epochs", "1", "--schedule-epochs", "2", "--check-every",
                    "1", "--metrics", two / "m.jsonl", "--checkpoint", two / "ck"))
    assert res.returncode == 0, res.stderr
    part = json.loads((two / "m.jsonl").read_text())
    res = run(ranks(2, *DRIVER, two, *RUN, "--epochs", "2", "--check-every", "1",
                    "--resume", two / "ck"))
    assert res.returncode == 0, res.stderr
    res = run((*DRIVER, one, *RUN, "--epochs", "2", "--accumulate", "2", "--metrics", one / "m.jsonl",
               "--checkpoint", one / "ck"))
    assert res.returncode == 0, res.stderr
    return two, one, part, time.monotonic() - started


def test_two_ranks_equal_one_process_with_accumulate_two(runs):
    two, one, part, _ = runs
    twin = records(one, 0)
    assert [r["step"] for r in twin] == [1, 2, 3, 4, 5, 6]        # 96 images, global batch 32
    for rank in (0, 1):
        mine = records(two, rank)
        assert [r["step"] for r in mine] == [1, 2, 3, 1, 2, 3]    # epoch 1, then the resumed epoch 2
        for a, b in zip(mine, twin):
            assert (a["loss"], a["correct"], a["batch"], a["state"]) == \
                   (b["loss"], b["correct"], b["batch"], b["state"]), (rank, a, b)
    # the metrics, with the evaluation shared between the ranks, and the checkpoints
    one_rows = rows(one / "m.jsonl")
    assert {k: v for k, v in part.items() if k not in ("images_per_s", "seconds")} == one_rows[0]
    assert rows(two / "m.jsonl") == one_rows
    a, b = ckpt.load(two / "ck"), ckpt.load(one / "ck")
    assert (a.epoch, a.header["ranks"], b.header["ranks"]) == (2, 2, 1)
    for group in ("params", "momentum", "state"):
        for name, value in getattr(b, group).items():
            np.testing.assert_array_equal(getattr(a, group)[name], value, err_msg=name)


def test_the_ranks_hold_the_same_state_after_every_step(runs):
    two = runs[0]
    assert [r["state"] for r in records(two, 0)] == [r["state"] for r in records(two, 1)]
    assert len({r["state"] for r in records(two, 0)}) == 6          # and it changes at every step


def test_rank_zero_alone_writes(runs):
    two = runs[0]
    assert sorted(p.name for p in (two / "ck").iterdir()) == ["checkpoint.json", "checkpoint.npz"]
    assert [r["epoch"] for r in rows(two / "m.jsonl")] == [1, 2]


def test_a_resume_keeps_the_number_of_ranks(runs):
    two = runs[0]
    res = run((*VGGEN, *RUN, "--epochs", "3", "--schedule-epochs", "3", "--resume", two / "ck"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"vggen: error: checkpoint {two / 'ck'} was trained on 2 ranks; a resumed run keeps them "
        f"(this one has 1): run it with mpiexec -n 2"]


def one_line(res: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr)
    return lines[0]


def test_ranks_started_with_different_options_are_refused(compiled, tmp_path):
    res = run((MPIEXEC, "-n", "1", *VGGEN, *RUN, "--epochs", "1", ":",
               "-n", "1", *VGGEN, *RUN, "--epochs", "1", "--lr", "0.5"))
    assert one_line(res) == ("vggen: error: rank 1 was started with --lr 0.5, rank 0 with --lr 0.01: "
                             "start every rank with the same options")
    assert not list(tmp_path.iterdir())


def test_ranks_with_different_kernels_are_refused(compiled, tmp_path):
    other = tmp_path / "generated"
    shutil.copytree(REPO / "generated", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["built_by"] = "another checkout"                  # the same sources, another manifest
    (other / "manifest.json").write_text(json.dumps(manifest))
    res = run((MPIEXEC, "-n", "1", *VGGEN, *RUN, "--epochs", "1", ":",
               "-n", "1", "-env", "VGGEN_GENERATED", other, *VGGEN, *RUN, "--epochs", "1"))
    line = one_line(res)
    assert line.startswith(f"vggen: error: rank 1 runs other generated kernels than rank 0 "
                           f"({other / 'manifest.json'}, sha256 "), line


def test_an_error_on_one_rank_ends_every_rank(compiled, tmp_path):
    started = time.monotonic()
    res = run(ranks(2, *DRIVER, tmp_path, *RUN, "--epochs", "50"), env={"DRIVER_FAULT": "raise:1:2"},
              timeout=60)
    assert time.monotonic() - started < 60
    assert res.returncode != 0 and "Traceback" not in res.stderr
    ours = [line for line in res.stderr.splitlines() if line.startswith("vggen:")]
    assert ours == ["vggen: error: rank 1: injected fault at step 2"], res.stderr   # MPI adds its own
    assert len(records(tmp_path, 0)) <= 2


def test_a_rank_that_stops_answering_times_out(compiled, tmp_path):
    started = time.monotonic()
    res = run(ranks(2, *DRIVER, tmp_path, *RUN, "--epochs", "50"),
              env={"DRIVER_FAULT": "hang:1:2", "VGGEN_COMM_TIMEOUT": "8"}, timeout=60)
    assert time.monotonic() - started < 60
    assert res.returncode != 0 and "Traceback" not in res.stderr
    ours = [line for line in res.stderr.splitlines() if line.startswith("vggen:")]
    assert ours == ["vggen: error: rank 0: no answer from the other ranks for 8 s (VGGEN_COMM_TIMEOUT) "
                    "in the gradient's allreduce: a rank died or hangs"], res.stderr


def test_a_killed_rank_ends_the_job(compiled, tmp_path):
    job = subprocess.Popen([str(c) for c in ranks(2, *DRIVER, tmp_path, *RUN, "--epochs", "500")],
                           cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        record = tmp_path / "rank1.jsonl"
        deadline = time.monotonic() + 60
        while not (record.exists() and record.read_text().count("\n") >= 2):   # mid-training
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.05)
        os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = job.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode != 0
    # the launcher's report (MPICH's Hydra: on stdout, "... EXIT STRING: Killed (signal 9)")
    said = stdout + stderr
    assert "signal 9" in said or "KILLED" in said.upper(), said
