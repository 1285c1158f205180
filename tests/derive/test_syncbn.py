"""--sync-bn's split BatchNormalization: the stages over R shards equal eqs. 19–20,
24–25 and 50 over the global batch, and the proof sees a wrong count."""

import numpy as np
import sympy as sp

from vggen.frontend import syncbn as stages
from vggen.frontend.lang import Equation, Layer
from vggen.frontend.layers import B, H, W
from vggen.proof import syncbn as proof


def test_composition_equals_global_batch():
    assert all(d is None for d in proof.symbolic_differences().values())
    errors = proof.numeric_errors()
    assert set(errors) == {"mu", "var", "y", "g_gamma", "g_beta", "g_x"}
    assert max(errors.values()) < proof.TOLERANCE


def test_one_rank_is_plain_batch_normalization():
    rng = np.random.default_rng(1)
    consts = {**proof.NUMERIC_SIZES[0][0]}
    shape = (consts[B], 3, consts[H], consts[W])
    x, g_y = rng.standard_normal(shape), rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    consts = {k: v for k, v in consts.items()}
    consts[next(s for s in consts if str(s) == "C")] = 3
    got = proof.compose(x, gamma, beta, g_y, 1, consts)
    want = proof.global_batch(x, gamma, beta, g_y, consts)
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-12, atol=1e-12)


def test_a_rank_local_count_is_caught(monkeypatch):
    """Eq. 50 with the rank's own B·H·W in place of the global N: the proof must fail."""
    def local_count():
        right = stages.input_gradient()
        count = sp.IndexedBase("count")
        eq = right.equations[0]
        wrong = eq.rhs.replace(lambda e: isinstance(e, sp.Indexed) and e.base.label == count.label,
                               lambda e: B * H * W)
        return Layer(right.name, right.tensors, [Equation(eq.lhs, wrong, "eq. 50")], constants=right.constants)
    monkeypatch.setattr(proof, "input_gradient", local_count)
    assert proof.symbolic_differences()["50"] is not None
    assert proof.numeric_errors()["g_x"] > 1e-3
