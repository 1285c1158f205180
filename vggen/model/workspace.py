"""Every array one batch size of the network needs, allocated once.

Per node the arrays of its forward program (activations, saved intermediates,
dropout masks, parameters) and in training those of its backward program.
The backward pass ping-pongs through two flat gradient buffers: ∂L/∂y of one
node is ∂L/∂x of the next, so only two activation-sized gradients are ever
alive.  Parameter gradients are the network's own arrays (``Network.grads``).
Because every step of one batch size reads and writes these same buffers,
a step's launches can be captured and replayed (``vggen.model.step``).

Each node's programs come from the backend that runs it
(``Network.backend_for``: a user's layer's op's), so its arrays have the
shapes and dtypes of those kernels; every backend of one network makes the
same kind of array, so one node's output is the next one's input as is.
A node's input and output are its kind's (``x`` and ``y`` but for a user's
layer), its seed ``g_<output>`` and the gradient it hands back ``g_<input>``.
"""

from __future__ import annotations

import math

import numpy as np

from vggen.model.kinds import running_weights


class Workspace:
    """Every array one batch size of ``net`` (a :class:`vggen.model.network.Network`)
    needs, allocated once."""

    def __init__(self, net, batch: int, train: bool):
        be = net.backend
        self.batch, self.train = batch, train
        self.images = be.zeros((batch,) + net.image_shape)
        self.labels = be.zeros((batch,), np.int32)
        self.forward: list[dict] = []      # per node: the arrays of its forward program
        self.backward: list[dict] = []     # per node: the arrays of its backward program
        self.running: dict = {}            # per BN node index: its running statistics' update
        self.mask_staging: dict = {}       # per masked node index: the host buffer its mask is drawn in
        x = self.images
        for node in net.nodes:
            kind = node.node_kind
            prog = net.backend_for(node).program(node.layer, node.all_sizes(batch))
            arrays = {node.input: x.reshape(prog.shapes[node.input])}
            if kind.reads_labels:
                arrays["t"] = self.labels
            if kind.identity_in_evaluation and not train:
                arrays["y"] = arrays["x"]          # the identity: no copy, no kernel
                self.forward.append(arrays)
                continue
            if kind.has_mask and train:
                arrays["R"] = be.zeros(prog.shapes["R"])
            for tname, key in node.params.items():
                arrays[tname] = net.params[key]
            for out in prog.outputs:
                if kind.statistics and not train and out in ("mu", "var"):
                    continue                       # the running statistics, given at evaluation
                arrays[out] = be.zeros(prog.shapes[out], prog.dtypes[out])
            if kind.statistics and train:
                mean, var = node.statistics_keys
                self.running[len(self.forward)] = {
                    "mu": arrays["mu"], "var": arrays["var"],
                    "k": be.asarray(running_weights(batch * node.sizes["H"] * node.sizes["W"])),
                    "running_mean": net.state[mean], "running_var": net.state[var]}
            self.forward.append(arrays)
            x = arrays[kind.output]
        self.logits = self.forward[-1]["x"]
        self.losses = self.forward[-1]["L"]
        self.seed = be.zeros((batch,))
        self.seed[...] = 1.0 / batch
        if train:
            self._allocate_backward(net)

    def _allocate_backward(self, net) -> None:
        be, batch = net.backend, self.batch
        biggest = max(math.prod(node.in_shape) for node in net.nodes) * batch
        flat = [be.zeros((biggest,)), be.zeros((biggest,))]
        g_y, turn = self.seed, 0
        self.backward = [None] * len(net.nodes)
        for k in range(len(net.nodes) - 1, -1, -1):
            node = net.nodes[k]
            prog = net.backend_for(node).program(node.backward, node.all_sizes(batch))
            arrays = dict(self.forward[k])
            seed_name, g_x = f"g_{node.output}", f"g_{node.input}"
            arrays[seed_name] = g_y.reshape(prog.shapes[seed_name])
            n = math.prod(prog.shapes[g_x])
            arrays[g_x] = flat[turn][:n].reshape(prog.shapes[g_x])
            for tname, key in node.params.items():
                arrays[f"g_{tname}"] = net.grads[key]
            for out in prog.outputs:         # reductions the gradients read (derive.simplify)
                if out not in arrays:
                    arrays[out] = net.backend_for(node).zeros(prog.shapes[out], prog.dtypes[out])
            self.backward[k] = arrays
            g_y, turn = arrays[g_x], 1 - turn


__all__ = ["Workspace"]
