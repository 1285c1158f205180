"""BatchNormalization's running statistics in a step of several ranks.

Each rank normalises with its own micro-batches' statistics (per-rank BN,
what PyTorch's DistributedDataParallel does without SyncBatchNorm): the
gradients are those of N independent micro-batches, as in one process with
``--accumulate N``.  The running averages that evaluation uses are another
matter: one process with ``--accumulate N`` updates them N times per step,
once per micro-batch in order, with the generated in-place kernel.  A rank
sees only its own micro-batches, so after its forwards it gathers every
rank's batch statistics (μ and σ² of every BN layer, a few kilobytes), puts
its running statistics back as they were before the step, and applies the
N·K updates in micro-batch order with the same kernel: every rank then holds
the running statistics of one process with ``--accumulate N``, bit for bit.

This costs N·K·(BN layers) small launches per step, which is nothing next to
a step on a few ranks; on hundreds it is the first thing to replace.
"""

from __future__ import annotations

import numpy as np

from vggen.model.kinds import running_statistics


class RunningStatistics:
    """Records a rank's batch statistics and applies every rank's in order."""

    def __init__(self, net):
        self.net = net
        self.nodes = [k for k, node in enumerate(net.nodes) if node.node_kind.statistics]
        self.channels = [net.nodes[k].sizes["C"] for k in self.nodes]
        self.width = 2 * sum(self.channels)          # per micro-batch: μ then σ² of each BN layer
        self._saved: dict | None = None

    def begin(self) -> None:
        """Remember the running statistics before the step's forwards change them."""
        be = self.net.backend
        self._saved = {key: np.array(be.to_host(v)) for key, v in self.net.state.items()}

    def record(self, ws) -> np.ndarray:
        """The batch statistics of the micro-batch just run forward on ``ws`` (float32, ``width``)."""
        arrays = []
        for k in self.nodes:
            arrays += [ws.running[k]["mu"], ws.running[k]["var"]]
        host = self.net.backend.to_host_all(arrays)
        return np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in host])

    def apply(self, ws, statistics: np.ndarray) -> None:
        """The running statistics as one process would update them with ``statistics``
        (one row per micro-batch, in global order), from those :meth:`begin` saved."""
        be, net = self.net.backend, self.net
        for key, value in self._saved.items():
            be.copy_in(net.state[key], value)
        layer = running_statistics()
        for row in np.asarray(statistics, np.float32):
            at = 0
            for k, c in zip(self.nodes, self.channels):
                arrays = ws.running[k]
                mu = np.ascontiguousarray(row[at:at + c]).reshape(arrays["mu"].shape)
                var = np.ascontiguousarray(row[at + c:at + 2 * c]).reshape(arrays["var"].shape)
                be.run(layer, {"C": c}, {**arrays, "mu": be.asarray(mu), "var": be.asarray(var)})
                at += 2 * c


__all__ = ["RunningStatistics"]
