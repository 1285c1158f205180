"""One training step: forward, backward, BatchNormalization's running statistics, the update.

:class:`TrainStep` runs it eagerly (every kernel launched from Python), or
on the CUDA target with ``graph=True`` as two captured CUDA graphs replayed
per step (:class:`vggen.runtime.cuda.StepGraphs`):

1. the host copies the batch, the dropout masks and the learning rate into
   the workspace's fixed buffers (on the step's stream);
2. graph A: every forward and backward kernel and the running statistics;
3. the host reads the per-image losses (the step's one synchronisation) and
   stops on a non-finite loss, before anything is updated;
4. graph B: the optimizer's kernel.

Every kernel reads and writes the same buffers at every step of one batch
size (``Network.workspace``, the flat parameters and gradients, the
optimizer's ``h``), which is what makes the launches replayable.  The first
step of a batch size runs eagerly on the stream (it compiles and loads the
kernels and prepares every program, none of which may happen during a
capture); the graphs are captured at the second.  Nothing else changes: the
same kernels, in the same order, on the same data, so the results equal the
eager step's.

A data-parallel step (:meth:`TrainStep.run` with several ranks, or several
micro-batches with ``accumulate``) is eager: per micro-batch the forward, the
backward with its gradients added up and, on the last micro-batch, reduced
over the ranks bucket by bucket as the backward produces them
(:mod:`vggen.distributed.gradients`); then one small gather of every
micro-batch's loss sum, correct count and BatchNormalization statistics,
which gives every rank the global loss (a non-finite one stops all ranks
before the update) and the running statistics of the whole global batch
(:mod:`vggen.distributed.batchnorm`); then the update, the same on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from vggen.distributed.batchnorm import RunningStatistics
from vggen.distributed.comm import Comm, SingleComm
from vggen.distributed.gradients import GradientReduction
from vggen.distributed.shard import MicroBatch
from vggen.distributed.syncbn import SyncBatchNormalization
from vggen.errors import VggenError
from vggen.model.network import Network, NonFiniteLoss, StepResult
from vggen.model.optim import SGD
from vggen.runtime.cuda import StepGraphs


class TrainStep:
    """``step(images, labels, lr)``: one batch in one process.  ``step.run(micro_batches, lr)``:
    this rank's micro-batches of a global batch over ``comm``'s ranks (``accumulate`` each)."""

    def __init__(self, net: Network, opt: SGD, graph: bool = False, comm: Comm | None = None,
                 accumulate: int = 1, sync_bn: bool = False):
        self.net, self.opt, self.graph = net, opt, graph
        self.comm = SingleComm() if comm is None else comm
        self.accumulate = accumulate
        self.parallel = self.comm.size > 1 or accumulate > 1
        if graph and self.parallel:
            raise VggenError("--cuda-graph with several ranks or --accumulate is not supported yet: "
                             "leave out --cuda-graph")
        self._graphs: dict = {}          # batch size -> (graph A, graph B), or None after its eager step
        self._recorder = StepGraphs(net.backend) if graph else None
        self._reduction = GradientReduction(self.comm, net, accumulate) if self.parallel else None
        self._statistics = RunningStatistics(net) if self.comm.size > 1 else None
        if sync_bn and self.comm.size > 1:       # with one rank, per-rank statistics are the global ones
            if accumulate > 1:
                raise VggenError("--sync-bn with --accumulate is not supported: "
                                 "BatchNormalization would need the statistics of micro-batches not yet run")
            net.sync_batch_norm = SyncBatchNormalization(net, self.comm)
            self._statistics = None              # every rank already holds the global running statistics

    @property
    def stream(self):
        """The stream the graph steps run on (None for eager steps)."""
        return self._recorder.stream if self._recorder is not None else None

    def __call__(self, images: np.ndarray, labels: np.ndarray, lr: float,
                 rng: np.random.Generator | None = None, masks: dict | None = None) -> StepResult:
        if not self.graph:
            result = self.net.train_step(images, labels, rng=rng, masks=masks)
            self.opt.step(lr)
            return result
        with self._recorder.stream:
            return self._replay(images, labels, lr, rng, masks)

    def _replay(self, images, labels, lr, rng, masks) -> StepResult:
        net, batch, recorder = self.net, len(labels), self._recorder
        ws = net.prepare(images, labels, train=True, rng=rng, masks=masks)
        self.opt.set_lr(lr)
        graphs = self._graphs.get(batch)
        if graphs is None:
            if batch not in self._graphs:          # first step of this size: eager, prepares everything
                self._graphs[batch] = None
                net.launch_forward(ws)
                net.backward(ws)
            else:                                  # second: capture, then replay
                graphs = self._graphs[batch] = (
                    recorder.capture(lambda: (net.launch_forward(ws), net.backward(ws))),
                    recorder.capture(self.opt.launch))
        if graphs is not None:
            recorder.replay(graphs[0])
        result = net.step_result(ws, labels)                    # waits for the step
        if graphs is not None:
            recorder.replay(graphs[1])
        else:
            self.opt.launch()
        return result

    def run(self, micro_batches: Sequence[MicroBatch], lr: float) -> StepResult:
        """One step of the global batch whose micro-batches on this rank are
        ``micro_batches`` (``accumulate`` of them); the result is the global batch's."""
        if not self.parallel:
            (only,) = micro_batches
            return self(only.images, only.labels, lr, rng=only.rng)
        if len(micro_batches) != self.accumulate:
            raise ValueError(f"{len(micro_batches)} micro-batches for --accumulate {self.accumulate}")
        with self.comm.step():          # bounded as a whole where the host waits through the GPU
            return self._parallel_step(micro_batches, lr)

    def _parallel_step(self, micro_batches: Sequence[MicroBatch], lr: float) -> StepResult:
        net, comm, k = self.net, self.comm, self.accumulate
        if self._statistics is not None:
            self._statistics.begin()
        sums, correct, statistics = np.zeros(k), np.zeros(k), []
        for j, micro in enumerate(micro_batches):
            ws = net.prepare(micro.images, micro.labels, train=True, rng=micro.rng)
            net.launch_forward(ws)
            net.backward(ws, after_node=self._reduction.after_node(j))
            sums[j], correct[j] = net.loss_and_correct(ws, micro.labels)
            if self._statistics is not None:
                statistics.append(self._statistics.record(ws))
        self._reduction.finish()
        # one gather: every micro-batch's loss sum and correct count, and its BN statistics
        # (float32, exact in float64), rank after rank: the global batch's order
        mine = np.concatenate([sums, correct, *(np.asarray(s, np.float64) for s in statistics)])
        every = comm.allgather(mine)
        total = 0.0
        for value in every[:, :k].reshape(-1):      # added in reading order, as one process would
            total += float(value)
        batch = len(micro_batches[0].labels) * k * comm.size
        loss = total / batch
        if not math.isfinite(loss):
            raise NonFiniteLoss(loss)
        if self._statistics is not None:
            rows = every[:, 2 * k:].reshape(comm.size * k, self._statistics.width)
            self._statistics.apply(ws, rows.astype(np.float32))
        self.opt.step(lr)
        return StepResult(loss, int(every[:, k:2 * k].sum()), batch)


__all__ = ["TrainStep"]
