"""``--sync-bn``: every BatchNormalization node normalises with the global batch's
μ and σ², run as the stages of vggen/frontend/syncbn.py (proved equal to eqs.
19–20, 24–25 and 50 over the global batch by ``vggen check``), each compiled
with ``vggen.compile`` for the network's target.

Forward, per BN node: Σx → allreduce → μ; Σ(x − μ)² → allreduce → σ²;
eqs. 21–22; the running statistics updated once with the global batch's
weights (n = R·B·H·W), so every rank holds one process's.

Backward, per BN node: the normalise stage's derived backward writes this
rank's partial ∂L/∂γ, ∂L/∂β into the gradient buffer; a copy of both is summed
over the ranks and eq. 50 uses the sums.  Scales: a rank's seed is the
gradient of its own mean loss, R times the global mean's, so the summed
partials are R times the global ∂L/∂γ, ∂L/∂β, consistent with that g_y in
eq. 50 (∂L/∂x comes out R times the global, like every other gradient on the
rank); the gradient buffer keeps the partials, which the gradient reduction
averages into the global ∂L/∂γ, ∂L/∂β.
"""

from __future__ import annotations

import numpy as np

from vggen.distributed.comm import Comm
from vggen.errors import VggenError
from vggen.frontend import syncbn as stages
from vggen.model.kinds import running_statistics, running_weights


class SyncBatchNormalization:
    """Runs the BN nodes of ``net`` over the global batch of ``comm``'s ranks."""

    def __init__(self, net, comm: Comm):
        self.net, self.comm = net, comm
        for node in net.nodes:
            if node.node_kind.statistics and node.kind != "bn":
                raise VggenError(f"--sync-bn runs BatchNormalization unfused; {node.name} is fused "
                                 f"({node.kind}): add --no-fuse")
        target = net.backend.name
        if target == "cuda":     # the statistics go through host arrays, which NCCL does not sum
            raise VggenError("--sync-bn runs on --target c or numpy for now: leave it out with --target cuda")
        from vggen.ops import compile as compile_layer     # vggen.ops imports the model
        # (backend, layer) per stage; on numpy the network's float32 backend evaluates the equations
        self._runners = {}
        for name, make in (("partial_sum", stages.partial_sum), ("mean", stages.mean),
                           ("partial_squares", stages.partial_squares), ("variance", stages.variance),
                           ("normalise", stages.normalise), ("input_gradient", stages.input_gradient)):
            op = compile_layer(make(), target)
            backend = net.backend if target == "numpy" else op.backend
            self._runners[name] = (backend, op.layer)
            if name == "normalise":
                self._runners["normalise_backward"] = (backend, op.backward_layer)
        self._buffers: dict = {}
        self._running = running_statistics()

    def _buffer(self, key, shape):
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = self._runners["mean"][0].zeros(shape)
        return buf

    def _run(self, stage: str, sizes: dict, arrays: dict, skip=()) -> None:
        backend, layer = self._runners[stage]
        backend.run(layer, sizes, arrays, skip=skip)

    def _allreduce(self, arrays: list) -> None:
        """Sum ``arrays`` (C floats each) over the ranks, in place, as one message."""
        be = self.net.backend
        host = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in be.to_host_all(arrays)])
        self.comm.wait([self.comm.allreduce_start(host)])
        at = 0
        for a in arrays:
            be.copy_in(a, host[at:at + a.size].reshape(a.shape))
            at += a.size

    def _count(self, sizes: dict):
        n = self.comm.size * sizes["B"] * sizes["H"] * sizes["W"]
        count = self._buffer(("count", n), (1,))
        self.net.backend.copy_in(count, np.array([n], np.float32))
        return count, n

    def forward(self, k: int, node, arrays: dict, ws) -> None:
        sizes = node.all_sizes(ws.batch)
        c = sizes["C"]
        count, n = self._count(sizes)
        s, q = self._buffer(("s", c), (c,)), self._buffer(("q", c), (c,))
        self._run("partial_sum", sizes, {"x": arrays["x"], "s": s})
        self._allreduce([s])
        self._run("mean", sizes, {"s": s, "count": count, "mu": arrays["mu"]})
        self._run("partial_squares", sizes, {"x": arrays["x"], "mu": arrays["mu"], "q": q})
        self._allreduce([q])
        self._run("variance", sizes, {"q": q, "count": count, "var": arrays["var"]})
        self._run("normalise", sizes, {name: arrays[name] for name in
                                        ("x", "gamma", "beta", "mu", "var", "xhat", "y")})
        running = ws.running[k]
        weights = self._buffer(("k", n), (3,))
        self.net.backend.copy_in(weights, running_weights(n))
        self.net.backend.run(self._running, {"C": c}, {**running, "k": weights})

    def backward(self, k: int, node, arrays: dict, ws) -> None:
        sizes = node.all_sizes(ws.batch)
        c = sizes["C"]
        count, _ = self._count(sizes)
        fwd = ws.forward[k]
        mine = {"g_y": arrays["g_y"], "x": fwd["x"], "gamma": fwd["gamma"], "beta": fwd["beta"],
                "mu": fwd["mu"], "var": fwd["var"], "xhat": fwd["xhat"],
                "g_gamma": arrays["g_gamma"], "g_beta": arrays["g_beta"],
                "g_x": arrays["g_x"]}          # skipped here: eq. 50 below writes it
        _, layer = self._runners["normalise_backward"]
        self._run("normalise_backward", sizes, {t.name: mine[t.name] for t in layer.tensors},
                  skip=("g_x",))
        g_gamma, g_beta = self._buffer(("g_gamma", c), (c,)), self._buffer(("g_beta", c), (c,))
        be = self.net.backend
        be.copy_in(g_gamma, be.to_host(arrays["g_gamma"]))
        be.copy_in(g_beta, be.to_host(arrays["g_beta"]))
        self._allreduce([g_gamma, g_beta])
        self._run("input_gradient", sizes, {"g_y": arrays["g_y"], "xhat": fwd["xhat"], "gamma": fwd["gamma"],
                                            "var": fwd["var"], "g_gamma": g_gamma, "g_beta": g_beta,
                                            "count": count, "g_x": arrays["g_x"]})


__all__ = ["SyncBatchNormalization"]
