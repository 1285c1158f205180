"""``vggen tune``: time the tiled CUDA contractions' candidate schedules on the GPU.

Every product the network runs (convolution forward, input and weight
gradients, Linear; one per layer and batch size) is an M×N×K matrix product
whose tile configuration and k-splits the kernel picks with a cost model
(:func:`vggen.compiler.targets.cuda.schedule.choose`).  The tuner replays each product, with
the arrays of a real training step, under every candidate — each
configuration, with one split, the model's split count, and doublings up to
the tile's budget — forced through the kernel's ``vg_tune_<kernel>`` hook,
and keeps the fastest (median of CUDA-event timings).  A candidate must beat
the model's own choice by ``MIN_GAIN`` to be recorded.

The records go to ``generated/tuning.json`` (merged with what is there: the
products of other batch sizes stay), written atomically, then the kernels are
rebuilt: ``vggen build`` compiles the records into each kernel's table
(``vg_tuned_<kernel>``) and the manifest lists them (``launch.tuned``).  The
record names the GPU it was measured on; it is an input of the build like
the templates, so commit it beside the kernels.

The choice logic (:func:`pick`, :func:`candidates`, :func:`merge`) is plain
Python, tested without a GPU; only :func:`measure` needs one.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggen.atomic import write_atomic
from vggen.compiler.targets.cuda import schedule as cuda_schedule
from vggen.compiler.targets.cuda.schedule import CONFIGS, TUNING_FILE, Tuned, Tuning, choose, tune_value
from vggen.errors import VggenError

MIN_GAIN = 0.03          # a measured choice must be this much faster than the model's to be kept
REPEATS = 5              # timed launches per candidate (median), after one warm-up launch


@dataclass(frozen=True)
class Product:
    """One M×N×K product a tiled kernel runs in the network."""

    kernel: str
    m: int
    n: int
    k: int


def candidates(m: int, n: int, k: int) -> list[int]:
    """Tune values worth timing for an M×N×K product: per configuration, one
    split, the model's count, and powers of two up to the clamp; each
    distinct (configuration, splits) once, the model's choice first."""
    best = choose(m, n, k)
    seen, out = set(), []

    def add(config, want):
        splits = cuda_schedule.usable_splits(CONFIGS[config], m, n, k, want)
        if (config, splits) not in seen:
            seen.add((config, splits))
            out.append(tune_value(config, splits))

    add(*best)
    for config in range(len(CONFIGS)):
        want = 1
        while want <= cuda_schedule.MAX_SPLITS:
            add(config, want)
            want *= 2
    return out


def pick(product: Product, times: dict[int, float], model: int | None = None) -> Tuned | None:
    """The record for ``product`` from its measured ``times`` (tune value →
    seconds, the model's choice under its own tune value ``model``, the first
    of ``candidates``): the fastest, if it beats the model's choice by
    MIN_GAIN, else None."""
    if model is None:
        model = tune_value(*choose(product.m, product.n, product.k))
    if model not in times:
        raise ValueError(f"{product}: the model's choice ({model}) was not timed")
    fastest = min(times, key=lambda t: (times[t], t))
    if fastest == model or times[fastest] > (1.0 - MIN_GAIN) * times[model]:
        return None
    return Tuned(product.m, product.n, product.k, fastest, round(times[fastest] * 1e3, 4),
                 round(times[model] * 1e3, 4))


def merge(old: Tuning | None, device: str, measured: dict[Product, Tuned | None]) -> Tuning:
    """``old``'s records with ``measured`` replacing those of the same products
    (a product where the model won loses its old record).  Records measured
    on another GPU are dropped."""
    kernels: dict = {}
    if old is not None and old.device == device:
        for name, entries in old.kernels.items():
            kernels[name] = {(t.m, t.n, t.k): t for t in entries}
    for p, t in measured.items():
        entries = kernels.setdefault(p.kernel, {})
        entries.pop((p.m, p.n, p.k), None)
        if t is not None:
            entries[(p.m, p.n, p.k)] = t
    return Tuning(device, {name: sorted(e.values(), key=lambda t: (t.m, t.n, t.k))
                           for name, e in kernels.items() if e})


def write_tuning(path: Path, tuning: Tuning) -> None:
    write_atomic(path, (json.dumps(tuning.as_json(), indent=2, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------- on the GPU


def step_programs(net, batch: int):
    """After one training step of ``net`` on random data (run here): each node's
    forward and backward program with that step's arrays (what the tuners replay)."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch,) + net.image_shape).astype(np.float32)
    labels = rng.integers(0, net.classes, batch).astype(np.int32)
    net.train_step(images, labels, rng=np.random.default_rng(1))
    ws = net.workspace(batch, True)
    for k, node in enumerate(net.nodes):
        for layer, arrays in ((node.layer, ws.forward[k]), (node.backward, ws.backward[k])):
            yield net.backend.program(layer, node.all_sizes(batch)), arrays


def network_products(net, batch: int) -> list[tuple[Product, object]]:
    """Each distinct tiled product of one training step of ``net`` (a CUDA
    network), with its ``vggen.runtime.cuda.Launch`` (bound to the arrays of a real
    step, run here first; ``launch.with_tune(t)`` runs it under tune value t)."""
    from vggen.manifest import eval_size

    out, seen = [], set()
    for prog, arrays in step_programs(net, batch):
        for launch in prog.launches(arrays):
            gemm = launch.spec.entry.get("launch", {}).get("gemm")
            if gemm is None:
                continue
            p = Product(launch.name, *(eval_size(gemm[d], prog.sizes) for d in ("M", "N", "K")))
            if p in seen:
                continue
            seen.add(p)
            out.append((p, launch))
    return out


def measure(run: Callable[[int], None], tunes: Iterable[int], cupy, repeats: int = REPEATS) -> dict[int, float]:
    """Seconds per launch of ``run(tune)`` for each tune value: the median of
    ``repeats`` launches timed with CUDA events, after one warm-up."""
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = {}
    for t in tunes:
        run(t)
        samples = []
        for _ in range(repeats):
            start.record()
            run(t)
            stop.record()
            stop.synchronize()
            samples.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
        times[t] = statistics.median(samples)
    return times


def tune(batch_sizes: Iterable[int] = (64,), width: int = 64, generated: str | Path | None = None,
         progress: Callable[[str], None] | None = logging.getLogger(__name__).info
         ) -> tuple[Path, Tuning, dict]:
    """Measure, record and rebuild (see the module docstring).  Returns the
    record's path, the record, and per product its (model ms, best ms)."""
    from vggen.compiler.emit import build
    from vggen.model.network import Network
    from vggen.paths import generated_dir
    from vggen.runtime import kernel_backend

    out_dir = Path(generated) if generated else generated_dir()
    be = kernel_backend("cuda", out_dir)
    device = be.device_name()
    measured, summary = {}, {}
    for batch in batch_sizes:
        if batch < 1:
            raise VggenError(f"--batch-size must be at least 1, got {batch}")
        net = Network(be, width=width, dropout=False, seed=0)
        products = network_products(net, batch)
        for n, (p, launch) in enumerate(products, 1):
            tunes = candidates(p.m, p.n, p.k)               # the model's choice first
            try:
                times = measure(launch.with_tune, tunes, be.cupy)
            finally:
                be.set_tune(launch.spec, 0)         # the kernel's own choice again
            measured[p] = pick(p, times, tunes[0])
            model = times[tunes[0]]
            summary[p] = (model * 1e3, min(times.values()) * 1e3)
            if progress:
                best = measured[p]
                what = (f"{CONFIGS[best.config].text()}, {best.splits} split(s)" if best else "the model's choice")
                progress(f"[{n}/{len(products)}] B={batch} {p.kernel} {p.m}x{p.n}x{p.k}: "
                         f"{summary[p][1]:.3f} ms ({what}; model {summary[p][0]:.3f} ms)")
    path = out_dir / TUNING_FILE
    record = merge(cuda_schedule.load_tuning(path), device, measured)
    write_tuning(path, record)
    build(out_dir)
    return path, record, summary


__all__ = ["Product", "candidates", "pick", "merge", "measure", "network_products", "tune",
           "write_tuning", "MIN_GAIN"]
