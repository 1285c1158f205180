"""``mpiexec -n 2 vggen train --sync-bn`` equals one process at the same global batch.

Two ranks of 16 images with --sync-bn against one process of 32, three steps
(96 synthetic images, tests/distributed/driver.py), no dropout or augmentation
(so both read the same images the same way).  Not bit for bit: the global sums
are added in another order (each rank's partial sum, then the allreduce), so
the comparison is at float32 rounding, with stated tolerances:

* the loss of every step within 1e-5 relative (measured: ~1e-6);
* every parameter and BN running statistic tensor within 1e-4 of its largest
  magnitude, every velocity within 5e-4 of its (measured: 5e-6, 7e-7 and 6e-5
  after three steps; a velocity is a sum of reordered gradient sums);
* per-rank statistics (no flag) are far outside these tolerances, so the
  comparison does discriminate (measured: the first loss differs by 1e-2).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.distributed.test_mpi import DRIVER, MPIEXEC, VGGEN, compiled, one_line, ranks, records, run  # noqa: F401
from vggen.model import checkpoint as ckpt

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install -e '.[mpi]')")

SAME = ("train", "--target", "c", "--width", "2", "-q", "--no-dropout", "--no-augment", "--epochs", "1")
LOSS_RTOL = 1e-5
STATE_RTOL = {"params": 1e-4, "state": 1e-4, "momentum": 5e-4}


@pytest.fixture(scope="module")
def stages_compiled(compiled):
    """The --sync-bn stages compiled into vggen.compile's cache before two ranks start together."""
    from vggen.frontend.syncbn import sync_batch_normalization_layers
    from vggen.ops import compile as compile_layer
    for layer in sync_batch_normalization_layers():
        compile_layer(layer, "c")


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def test_two_ranks_with_sync_bn_equal_one_process_at_the_global_batch(stages_compiled, tmp_path):
    two, one, plain = tmp_path / "two", tmp_path / "one", tmp_path / "plain"
    res = run(ranks(2, *DRIVER, two, *SAME, "--batch-size", "16", "--sync-bn", "--check-every", "1",
                    "--checkpoint", two / "ck"))
    assert res.returncode == 0, res.stderr
    res = run((*DRIVER, one, *SAME, "--batch-size", "32", "--checkpoint", one / "ck"))
    assert res.returncode == 0, res.stderr
    res = run(ranks(2, *DRIVER, plain, *SAME, "--batch-size", "16"))
    assert res.returncode == 0, res.stderr
    twin = records(one, 0)
    assert [r["step"] for r in twin] == [1, 2, 3]
    for rank in (0, 1):
        mine = records(two, rank)
        assert [(r["step"], r["batch"]) for r in mine] == [(1, 32), (2, 32), (3, 32)]
        for a, b in zip(mine, twin):
            assert abs(a["loss"] - b["loss"]) <= LOSS_RTOL * abs(b["loss"]), (rank, a, b)
    assert [r["state"] for r in records(two, 0)] == [r["state"] for r in records(two, 1)]
    a, b = ckpt.load(two / "ck"), ckpt.load(one / "ck")
    for group, rtol in STATE_RTOL.items():
        for name, value in getattr(b, group).items():
            assert relative(getattr(a, group)[name], value) <= rtol, (group, name)
    # per-rank statistics: another trajectory, outside the tolerance
    first = records(plain, 0)[0]["loss"]
    assert abs(first - twin[0]["loss"]) > 100 * LOSS_RTOL * abs(twin[0]["loss"])


def test_sync_bn_with_accumulate_is_refused(stages_compiled, tmp_path):
    res = run(ranks(2, *VGGEN, *SAME, "--batch-size", "8", "--accumulate", "2", "--sync-bn"))
    assert one_line(res).startswith("vggen: error: --sync-bn with --accumulate is not supported")


def test_sync_bn_with_a_fused_batch_normalization_is_refused(stages_compiled, tmp_path):
    res = run(ranks(2, *VGGEN, *SAME, "--batch-size", "16", "--fuse", "--sync-bn"))
    assert one_line(res) == ("vggen: error: --sync-bn runs BatchNormalization unfused; bn1 is fused "
                             "(bn_relu): add --no-fuse")
