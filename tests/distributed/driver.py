"""``vggen`` as one rank of a test run: ``python -m tests.distributed.driver OUT vggen-args...``.

The real command line (``vggen.tools.cli.main``), with three things added for
the tests in test_mpi.py:

* the data are a small synthetic set (96 training and 40 test images, the
  digits' shape), so a run's steps cost little next to its start;
* after every step the rank appends the step's loss, correct count and a hash
  of its parameters, velocities and BN statistics to ``OUT/rank<R>.jsonl``, and
  writes its process id to ``OUT/rank<R>.pid`` at start;
* ``DRIVER_FAULT=raise:R:S`` makes rank R raise a VggenError at step S, and
  ``hang:R:S`` makes it stop answering there (it sleeps).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import vggen.tools.train as train_module
from vggen.data.datasets import Dataset
from vggen.distributed.checks import state_digest
from vggen.errors import VggenError
from vggen.model.step import TrainStep
from vggen.tools.cli import main

TRAIN, TEST = 96, 40


def synthetic(name, data, seed):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((TRAIN + TEST, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, TRAIN + TEST).astype(np.int32)
    return (Dataset(images[:TRAIN].copy(), labels[:TRAIN].copy(), "synthetic-train"),
            Dataset(images[TRAIN:].copy(), labels[TRAIN:].copy(), "synthetic-test"))


def _rank() -> int:
    return int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


def instrument(out: Path) -> None:
    rank = _rank()
    fault = os.environ.get("DRIVER_FAULT", "")
    kind, fault_rank, fault_step = (fault.split(":") + ["", "", ""])[:3] if fault else ("", "-1", "0")
    (out / f"rank{rank}.pid").write_text(str(os.getpid()))
    record = out / f"rank{rank}.jsonl"
    real_run = TrainStep.run
    steps = [0]

    def run(self, micro_batches, lr):
        steps[0] += 1
        if rank == int(fault_rank) and steps[0] == int(fault_step):
            if kind == "raise":
                raise VggenError(f"injected fault at step {steps[0]}")
            if kind == "hang":
                time.sleep(600)
        result = real_run(self, micro_batches, lr)
        line = {"step": steps[0], "loss": result.loss, "correct": result.correct, "batch": result.batch,
                "state": state_digest(self.net, self.opt).hex()}
        with record.open("a") as f:
            f.write(json.dumps(line) + "\n")
        return result

    TrainStep.run = run
    train_module.load_dataset = synthetic


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    instrument(out)
    sys.exit(main(sys.argv[2:]))
