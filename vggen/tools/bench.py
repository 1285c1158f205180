"""``vggen bench``: images/s of one training step, beside PyTorch in the same process.

A step is forward + backward + the SGD update (momentum 0.9, weight decay
5e-4) on a synthetic batch, dropout off on both sides.  Times are medians of
``steps`` steps after warm-up: CUDA events on the GPU, the host clock on the
CPU.  PyTorch runs the same architecture (vggen.model.network's node list) in
float32 with TF32 off, cuDNN autotuning on; on the CPU with every core.
With ``precision="bf16"`` (the c target only) vggen's contractions multiply in
bf16 (``vggen.runtime.c``) and PyTorch runs its forward and loss under
``torch.autocast("cpu", dtype=torch.bfloat16)``: bf16 against bf16.
A second, profiled pass times each generated kernel for the per-kernel table.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from vggen.errors import VggenError
from vggen.model.architecture import DEFAULT, load_model
from vggen.model.network import BN_EPS, Network, build_nodes
from vggen.model.optim import SGD
from vggen.model.step import TrainStep
from vggen.runtime import get_backend, resolve_target
from vggen.runtime.base import size_values, tensor_shapes

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


@dataclass
class KernelTime:
    name: str
    calls: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0


@dataclass
class BenchResult:
    target: str
    device: str
    batch_size: int
    width: int
    step_seconds: float
    images_per_s: float
    torch_step_seconds: float | None = None
    torch_images_per_s: float | None = None
    torch_note: str = ""
    kernels: list = field(default_factory=list)
    fused: bool = True                  # BN → ReLU (→ dropout) run as one layer
    graph: bool = False                 # steps replayed as CUDA graphs
    model: str = DEFAULT                # vggen.model.architecture: a shipped name or a file
    conv_algorithm: str = "auto"        # vggen.runtime.algorithms: how 3×3 convolutions run
    precision: str = "fp32"             # "bf16": the contractions' products (both sides)

    @property
    def ratio(self) -> float | None:
        return self.images_per_s / self.torch_images_per_s if self.torch_images_per_s else None

    def as_dict(self) -> dict:
        return {"target": self.target, "device": self.device, "batch_size": self.batch_size,
                "width": self.width, "model": self.model, "precision": self.precision,
                "fused": self.fused, "cuda_graph": self.graph, "conv_algorithm": self.conv_algorithm,
                "step_seconds": self.step_seconds,
                "images_per_s": self.images_per_s, "torch_step_seconds": self.torch_step_seconds,
                "torch_images_per_s": self.torch_images_per_s, "ratio": self.ratio,
                "torch_note": self.torch_note,
                "kernels": [k.__dict__ | {"share": k.seconds / max(self._kernel_total(), 1e-30)}
                            for k in self.kernels]}

    def _kernel_total(self) -> float:
        return sum(k.seconds for k in self.kernels)


# --------------------------------------------------------------------------- timers


class _HostTimer:
    def __init__(self):
        self.t0 = 0.0

    def start(self):
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self.t0


class _CudaTimer:
    """Events on ``stream`` (the step's: a graph step runs on its own stream)."""

    def __init__(self, cupy, stream=None):
        self.cupy, self.stream = cupy, stream
        self.a, self.b = cupy.cuda.Event(), cupy.cuda.Event()

    def start(self):
        self.a.record(self.stream)

    def stop(self) -> float:
        self.b.record(self.stream)
        self.b.synchronize()
        return self.cupy.cuda.get_elapsed_time(self.a, self.b) / 1e3


class _Profiler:
    """Times each kernel call: host clock for C, event pairs for CUDA."""

    def __init__(self, cupy=None):
        self.cupy = cupy
        self.pending: list = []
        self.totals: dict = defaultdict(lambda: [0, 0.0])

    def begin(self, name):
        if self.cupy is None:
            self.pending.append((name, time.perf_counter()))
        else:
            ev = self.cupy.cuda.Event()
            ev.record()
            self.pending.append((name, ev))

    def end(self, name):
        _, start = self.pending.pop()
        if self.cupy is None:
            self._add(name, time.perf_counter() - start)
        else:
            ev = self.cupy.cuda.Event()
            ev.record()
            self.pending.append(("__done__", (name, start, ev)))

    def collect(self):
        for tag, item in self.pending:
            if tag == "__done__":
                name, a, b = item
                b.synchronize()
                self._add(name, self.cupy.cuda.get_elapsed_time(a, b) / 1e3)
        self.pending = []

    def _add(self, name, seconds):
        self.totals[name][0] += 1
        self.totals[name][1] += seconds


# --------------------------------------------------------------------------- vggen


def _kernel_work(net: Network, batch: int, manifest_specs, target: str, backend=None) -> dict:
    """FLOPs and bytes per generated kernel name, summed over the network's calls
    (the layers', forward and backward, then the running statistics and the update).
    A kernel run by another algorithm (``backend.algorithm_for``: Winograd) is
    credited with the direct kernel's FLOPs: its GFLOP/s are effective ones."""
    from vggen.frontend.layers import batch_normalization_running
    from vggen.frontend.updates import sgd_momentum
    from vggen.manifest import kernels_for
    from vggen.model.network import BN_KINDS
    from vggen.runtime.numpy import reduction_extent

    calls = [(layer, node.all_sizes(batch)) for node in net.nodes for layer in (node.layer, node.backward)]
    calls += [(batch_normalization_running(), {"C": node.sizes["C"]}) for node in net.nodes
              if node.kind in BN_KINDS]
    calls.append((sgd_momentum(), {"N": int(net.flat_params.shape[0])}))
    work: dict = defaultdict(lambda: [0.0, 0.0])
    for layer, sizes in calls:
        consts = size_values(layer, sizes)
        shapes = tensor_shapes(layer, consts)
        for spec in kernels_for(manifest_specs, target, layer):
            name = spec.name
            if backend is not None and hasattr(backend, "algorithm_for"):
                name = backend.algorithm_for(spec, {s.name: v for s, v in consts.items()}).name
            for eq in layer.equations:
                if eq.target not in spec.writes:
                    continue
                out = int(np.prod(shapes[eq.target]))
                work[name][0] += 2.0 * out * reduction_extent(eq, consts)
            work[name][1] += 4.0 * sum(int(np.prod(shapes[a.name])) for a in spec.tensors)
    return work


def _vggen_step(target: str, batch: int, width: int, steps: int, warmup: int, seed: int,
                fuse: bool | None = None, graph: bool = False, allow_modified_kernels: bool = False,
                model: str = DEFAULT, precision: str = "fp32", conv_algorithm: str = "auto"):
    backend = get_backend(target, allow_modified_kernels=allow_modified_kernels, precision=precision)
    backend.conv_algorithm = conv_algorithm
    net = Network(backend, width=width, dropout=False, seed=seed, fuse=fuse, model=model)
    opt = SGD(net.params, net.grads, backend, MOMENTUM, WEIGHT_DECAY, flat=(net.flat_params, net.flat_grads))
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    cupy = getattr(backend, "cupy", None)
    run = TrainStep(net, opt, graph=graph)
    timer = _CudaTimer(cupy, getattr(run, "stream", None)) if cupy is not None else _HostTimer()

    def step():
        run(images, labels, LR)

    for _ in range(max(warmup, 2 if graph else 0)):      # a graph is captured at the second step
        step()
    backend.synchronize()
    times = []
    for _ in range(steps):
        timer.start()
        step()
        times.append(timer.stop())
    backend.synchronize()

    prof = _Profiler(cupy)
    # every backend the nodes run on: a user's layer runs on its own op's
    backends = list({id(b): b for b in [backend, *map(net.backend_for, net.nodes)]}.values())
    for b in backends:
        b.profiler = prof
    profiled = max(3, steps // 4)
    eager = TrainStep(net, opt)                          # per-kernel times need the launches
    for _ in range(profiled):
        eager(images, labels, LR)
    backend.synchronize()
    prof.collect()
    for b in backends:
        b.profiler = None
    work = _kernel_work(net, batch, backend.specs, backend.manifest_target
                        if hasattr(backend, "manifest_target") else "cuda", backend)
    kernels = [KernelTime(name, calls // profiled, sec / profiled, work[name][0], work[name][1])
               for name, (calls, sec) in prof.totals.items()]
    kernels.sort(key=lambda k: -k.seconds)
    device = backend.device_name()
    return statistics.median(times), kernels, device, net.fuse


# --------------------------------------------------------------------------- PyTorch


def torch_model(nodes):
    """The same architecture as the node list ``nodes`` (``network.build_nodes``),
    in PyTorch (float32, no biases)."""
    import torch

    nn = torch.nn
    mods = []
    for node in nodes:
        for kind in [k for k, _ in node.members] or [node.kind]:     # a fused node: its parts
            if kind == "conv":
                mods.append(nn.Conv2d(node.sizes["IC"], node.sizes["OC"], 3, padding=1, bias=False))
            elif kind == "bn":
                after_linear = bool(mods) and isinstance(mods[-1], nn.Linear)
                bn = nn.BatchNorm1d if after_linear else nn.BatchNorm2d
                mods.append(bn(node.sizes["C"], eps=BN_EPS))
            elif kind == "relu":
                mods.append(nn.ReLU())
            elif kind == "dropout":
                mods.append(nn.Dropout(node.ratio))
            elif kind == "pool":
                mods.append(nn.MaxPool2d(2))
            elif kind == "linear":
                if not any(isinstance(m, nn.Flatten) for m in mods):
                    mods.append(nn.Flatten())
                mods.append(nn.Linear(node.sizes["IC"], node.sizes["C"], bias=False))
    return nn.Sequential(*mods)


def _torch_step(target: str, batch: int, width: int, steps: int, warmup: int, seed: int,
                model: str = DEFAULT, precision: str = "fp32"):
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed"
    on_gpu = target == "cuda"
    if on_gpu and not torch.cuda.is_available():
        return None, "PyTorch has no CUDA device"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    nodes = build_nodes(width, dropout=False, model=model)
    if any(node.kind == "layer" for node in nodes):
        return None, "the model has layers of the user's own (`layer`), which have no PyTorch twin here"
    dev = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(seed)
    net = torch_model(nodes).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    bf16 = precision == "bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        # bf16: PyTorch's mixed precision (fp32 weights, bf16 convolutions and products)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if on_gpu:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    what = "cuDNN, fp32, TF32 off" if on_gpu else f"oneDNN, {torch.get_num_threads()} threads"
    if bf16:
        what += ', torch.autocast("cpu", dtype=torch.bfloat16)'
    return statistics.median(times), f"PyTorch {torch.__version__} ({what})"


# --------------------------------------------------------------------------- driver


def bench(target: str = "auto", batch_size: int = 64, width: int = 64, steps: int = 20,
          warmup: int = 3, seed: int = 0, torch: bool = True, fuse: bool | None = None,
          graph: bool = False, allow_modified_kernels: bool = False,
          model: str = DEFAULT, precision: str = "fp32", conv_algorithm: str = "auto") -> BenchResult:
    if batch_size < 1:
        raise VggenError(f"--batch-size must be at least 1, got {batch_size}")
    if width < 1:
        raise VggenError(f"--width must be at least 1, got {width}")
    if steps < 1:
        raise VggenError(f"--steps must be at least 1, got {steps}")
    target = resolve_target(target)
    if target == "numpy":
        raise VggenError("vggen bench measures the generated kernels: use --target c or cuda")
    if precision != "fp32" and target != "c":
        raise VggenError(f"--precision {precision} is for the c target only, not {target}")
    load_model(model)
    seconds, kernels, device, fused = _vggen_step(target, batch_size, width, steps, warmup, seed, fuse,
                                                  graph, allow_modified_kernels, model=model,
                                                  precision=precision, conv_algorithm=conv_algorithm)
    result = BenchResult(target, device, batch_size, width, seconds, batch_size / seconds,
                         kernels=kernels, fused=fused, graph=graph, model=model, precision=precision,
                         conv_algorithm=conv_algorithm)
    if torch:
        t, note = _torch_step(target, batch_size, width, steps, warmup, seed, model=model,
                              precision=precision)
        result.torch_note = note
        if t is not None:
            result.torch_step_seconds = t
            result.torch_images_per_s = batch_size / t
    return result


def format_table(r: BenchResult) -> str:
    lines = [f"vggen bench: {r.target} on {r.device}, batch {r.batch_size}, width {r.width}"
             f"{'' if r.model == DEFAULT else f', model {r.model}'}"
             f"{'' if r.fused else ', unfused'}{', CUDA graphs' if r.graph else ''}"
             f"{'' if r.precision == 'fp32' else f', precision {r.precision}'}"
             f"{'' if r.conv_algorithm == 'auto' else f', convolutions {r.conv_algorithm}'}",
             f"  vggen   {r.step_seconds * 1e3:9.2f} ms/step  {r.images_per_s:10.1f} images/s"]
    if r.torch_images_per_s:
        lines.append(f"  PyTorch {r.torch_step_seconds * 1e3:9.2f} ms/step  "
                     f"{r.torch_images_per_s:10.1f} images/s  ({r.torch_note})")
        lines.append(f"  ratio vggen/PyTorch: {r.ratio:.2f}")
    elif r.torch_note:
        lines.append(f"  PyTorch: not measured ({r.torch_note})")
    total = sum(k.seconds for k in r.kernels) or 1e-30
    lines += ["", f"  {'kernel':45s} {'calls':>5s} {'ms/step':>9s} {'share':>6s} {'GFLOP/s':>9s} {'GB/s':>8s}"]
    for k in r.kernels:
        gflops = k.flops / k.seconds / 1e9 if k.seconds else 0.0
        gbs = k.bytes / k.seconds / 1e9 if k.seconds else 0.0
        lines.append(f"  {k.name:45s} {k.calls:5d} {k.seconds * 1e3:9.3f} {k.seconds / total:6.1%} "
                     f"{gflops:9.1f} {gbs:8.1f}")
    lines.append(f"  {'(kernels, total)':45s} {'':5s} {total * 1e3:9.3f}")
    if any("_winograd" in k.name for k in r.kernels):
        lines.append("  (a _winograd kernel's GFLOP/s count the direct convolution's work: effective)")
    return "\n".join(lines)
