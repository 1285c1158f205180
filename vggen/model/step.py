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
"""

from __future__ import annotations

import numpy as np

from vggen.model.network import Network, StepResult
from vggen.model.optim import SGD
from vggen.runtime.cuda import StepGraphs


class TrainStep:
    def __init__(self, net: Network, opt: SGD, graph: bool = False):
        self.net, self.opt, self.graph = net, opt, graph
        self._graphs: dict = {}          # batch size -> (graph A, graph B), or None after its eager step
        self._recorder = StepGraphs(net.backend) if graph else None

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


__all__ = ["TrainStep"]
