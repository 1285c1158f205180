"""``--sync-bn`` proved: the stages of vggen/frontend/syncbn.py run on R
shards, with a sum over ranks where the allreduce is, equal eqs. 19, 20, 24,
25 and 50 over the global batch of R·B samples.

Two checks per equation, both required:

* ``symbolic at sizes``: with R and every size set to small values, the
  composed expression (each rank's partial sum with its samples at offset
  r·B, summed over r, divided by N) and the document's equation over the
  global batch expand to the same polynomial in the data, at every output
  element;
* ``numeric``: float64, random data, the stages evaluated rank by rank as the
  generated kernels would be, against BatchNormalization's forward and its
  derived backward over the global batch (relative difference < 1e-10).
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from vggen.derive.autodiff import derive
from vggen.frontend.layers import EPS, B, C, H, W, b, batch_normalization
from vggen.frontend.syncbn import input_gradient, mean, normalise, partial_squares, partial_sum, variance
from vggen.proof.document import document_equations
from vggen.proof.evaluate import run_forward
from vggen.proof.verify import Row, _gradients

# the tensors whose first index is the sample (sharded by rank)
BATCHED = ("x", "g_y", "xhat", "g_x")
SYMBOLIC_SIZES = [({B: 1, C: 1, H: 2, W: 1}, 2), ({B: 2, C: 2, H: 1, W: 2}, 3)]
NUMERIC_SIZES = [({B: 3, C: 5, H: 5, W: 5, EPS: 2e-5}, 2), ({B: 2, C: 4, H: 3, W: 7, EPS: 2e-5}, 3)]
TOLERANCE = 1e-10


def compose(x, gamma, beta, g_y, ranks: int, consts: dict) -> dict:
    """The stages run on ``ranks`` shards of the global ``x`` and ``g_y`` (float64);
    ``np.sum`` over the ranks' partial results stands where the allreduce is.
    ``consts`` holds the shard's sizes (B per rank)."""
    shards_x, shards_gy = np.split(x, ranks), np.split(g_y, ranks)
    count = np.array([float(x.shape[0] * x.shape[2] * x.shape[3])])
    allreduce = lambda parts: np.sum(parts, axis=0)
    s = allreduce([run_forward(partial_sum(), {"x": xr}, consts)["s"] for xr in shards_x])
    mu = run_forward(mean(), {"s": s, "count": count}, consts)["mu"]
    q = allreduce([run_forward(partial_squares(), {"x": xr, "mu": mu}, consts)["q"] for xr in shards_x])
    var = run_forward(variance(), {"q": q, "count": count}, consts)["var"]
    norm, norm_backward = normalise(), derive(normalise())
    forwards = [run_forward(norm, {"x": xr, "gamma": gamma, "beta": beta, "mu": mu, "var": var}, consts)
                for xr in shards_x]
    partials = [_gradients(norm_backward, {**env, "g_y": gy}, consts) for env, gy in zip(forwards, shards_gy)]
    g_gamma = allreduce([p["g_gamma"] for p in partials])
    g_beta = allreduce([p["g_beta"] for p in partials])
    g_x = [run_forward(input_gradient(), {"g_y": gy, "xhat": env["xhat"], "gamma": gamma, "var": var,
                                          "g_gamma": g_gamma, "g_beta": g_beta, "count": count}, consts)["g_x"]
           for env, gy in zip(forwards, shards_gy)]
    return {"mu": mu, "var": var, "y": np.concatenate([env["y"] for env in forwards]),
            "g_gamma": g_gamma, "g_beta": g_beta, "g_x": np.concatenate(g_x)}


def global_batch(x, gamma, beta, g_y, consts: dict) -> dict:
    """BatchNormalization's forward and derived backward over the whole batch (one process)."""
    layer = batch_normalization()
    env = run_forward(layer, {"x": x, "gamma": gamma, "beta": beta}, consts)
    return _gradients(derive(layer), {**env, "g_y": g_y}, consts)


def numeric_errors(seed: int = 0) -> dict:
    """Largest relative difference, per quantity, of the composition against the global batch."""
    rng = np.random.default_rng(seed)
    worst: dict = {}
    for consts, ranks in NUMERIC_SIZES:
        local_b = consts[B]
        shape = (ranks * local_b, consts[C], consts[H], consts[W])
        # an offset mean, so that a Σx² − μ² form would show its cancellation
        x = 3.0 + rng.standard_normal(shape)
        gamma, beta = rng.standard_normal(consts[C]), rng.standard_normal(consts[C])
        g_y = rng.standard_normal(shape)
        got = compose(x, gamma, beta, g_y, ranks, consts)
        want = global_batch(x, gamma, beta, g_y, {**consts, B: ranks * local_b})
        for name, value in got.items():
            err = float(np.max(np.abs(value - want[name])) / max(np.max(np.abs(want[name])), 1e-300))
            worst[name] = max(worst.get(name, 0.0), err)
    return worst


# --------------------------------------------------------------------------- symbolic at sizes


def _plain(expr, rank: int, local_b: int):
    """Every access on a plain IndexedBase (so that the layers' tensors of one
    name are one symbol), the sample index of a batched tensor moved to the
    rank's offset r·B."""
    def rebase(acc):
        name = str(acc.base.label)
        ix = list(acc.indices)
        if name in BATCHED:
            ix[0] = rank * local_b + ix[0]
        return sp.IndexedBase(name)[tuple(ix)]
    return expr.replace(lambda e: isinstance(e, sp.Indexed), rebase)


def _expand(expr, sizes: dict):
    return sp.expand(expr.subs(sizes).doit())


def symbolic_differences() -> dict:
    """Per equation, the first non-zero difference found (composition − document), or None."""
    docs = {d.number: d for d in document_equations() if d.layer == "BatchNormalization"}
    fwd = {eq.label: eq for eq in batch_normalization().equations}
    norm_bw = {g.tensor.name: g.equation.rhs for g in derive(normalise()).gradients}
    partial_s, partial_q = partial_sum().equations[0].rhs, partial_squares().equations[0].rhs
    grad_x = input_gradient().equations[0].rhs
    found: dict = {"19": None, "20": None, "24": None, "25": None, "50": None}
    for sizes, ranks in SYMBOLIC_SIZES:
        local = sizes
        whole = {**sizes, B: ranks * sizes[B]}
        n = ranks * sizes[B] * sizes[H] * sizes[W]
        over_ranks = lambda e: sum(_expand(_plain(e, r, sizes[B]), local) for r in range(ranks))
        composed = {
            "19": over_ranks(partial_s) / n,
            "20": over_ranks(partial_q) / n,
            "24": over_ranks(norm_bw["g_gamma"]),
            "25": over_ranks(norm_bw["g_beta"]),
        }
        reference = {
            "19": _expand(_plain(fwd["eq. 19"].rhs, 0, 0), whole),
            "20": _expand(_plain(fwd["eq. 20"].rhs, 0, 0), whole),
            "24": _expand(_plain(docs["24"].expr, 0, 0), whole),
            "25": _expand(_plain(docs["25"].expr, 0, 0), whole),
        }
        for number in composed:
            d = sp.expand(composed[number] - reference[number])
            if d != 0 and found[number] is None:
                found[number] = d
        # eq. 50 at every rank's samples, count = N; ∂L/∂γ and ∂L/∂β are the global
        # sums on both sides (their composition is eqs. 24–25 above)
        count = sp.IndexedBase("count")
        for r in range(ranks):
            mine = _plain(grad_x, r, sizes[B]).subs(local).xreplace({count[0]: sp.Integer(n)})
            doc = _plain(docs["50"].expr, 0, 0).xreplace({b: r * sizes[B] + b}).subs(whole)
            d = sp.expand(mine - doc)
            if d != 0 and found["50"] is None:
                found["50"] = d
    return found


def sync_batch_normalization_rows() -> list[Row]:
    """One row per equation for ``vggen check``."""
    symbolic = symbolic_differences()
    numeric = numeric_errors()
    quantity = {"19": "mu", "20": "var", "24": "g_gamma", "25": "g_beta", "50": "g_x"}
    what = {"19": "μ", "20": "σ²", "24": "∂L/∂γ", "25": "∂L/∂β", "50": "∂L/∂x"}
    shown = "; ".join(f"R={r}, B={s[B]}, C={s[C]}, H={s[H]}, W={s[W]}" for s, r in SYMBOLIC_SIZES)
    rows = []
    for number, name in quantity.items():
        err = numeric[name]
        ok = symbolic[number] is None and err < TOLERANCE
        detail = (f"Σ over R shards equals the global batch at {shown}"
                  if symbolic[number] is None else f"differs: {symbolic[number]}")
        detail += f"; float64 max rel. difference {err:.1e}"
        rows.append(Row("BatchNormalization (--sync-bn)", what[number], number,
                        "symbolic at sizes; numeric", "pass" if ok else "fail", detail,
                        "partial sums, allreduce, finalise", err, None))
    return rows


__all__ = ["compose", "global_batch", "numeric_errors", "symbolic_differences", "sync_batch_normalization_rows"]
