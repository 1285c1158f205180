"""``vggen tune``: time each algorithm of the network's convolutions on this device
(``--target c``: this CPU; ``--target cuda``: this GPU, after the tile tuning).

A kernel with other algorithms' kernels beside it (direct, Winograd F(2×2, 3×3),
F(4×4, 3×3): ``vggen.runtime.algorithms``) is replayed, with the arrays of a
real training step, under each algorithm; the fastest (the minimum of
``REPEATS`` timed calls after a warm-up one: the least disturbed by other
work) is recorded per kernel and sizes.

The records go to the target's file (``vggen.compiler.measured.RECORD_FILES``:
``generated/algorithms.json``, ``algorithms-cuda.json``; merged with what is
there: other batch sizes' and widths' stay), written atomically, then the
kernels are rebuilt: ``vggen build`` copies the records into the manifest (the
direct kernel's ``measured`` entries), where the runtime reads them first.
The record names the device; commit it beside the kernels.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path


from vggen.atomic import write_atomic
from vggen.compiler.measured import RECORD_FILES, load_records, merge
from vggen.errors import VggenError
from vggen.tools.tune import step_programs

REPEATS = 5


def network_choices(net, batch: int):
    """Each distinct kernel with other algorithms in one training step of ``net``:
    (direct spec, every candidate spec, its program, the step's arrays)."""
    be = net.backend
    by_name = {s.name: s for s in be.kernels}
    seen = set()
    for prog, arrays in step_programs(net, batch):
        for call in prog.calls:
            direct = by_name[call.spec.replaces] if call.spec.replaces else call.spec
            alternatives = be.manifest.alternatives(direct)
            sizes = {a.name: int(prog.sizes[a.name]) for a in direct.args if a.kind == "size"}
            key = (direct.name, tuple(sorted(sizes.items())))
            if not alternatives or key in seen:
                continue
            seen.add(key)
            yield direct, [direct, *alternatives], sizes, prog, arrays


def time_call(be, prog, spec, arrays, repeats: int = REPEATS) -> float:
    """Milliseconds of one call of ``spec`` on the program's arrays (the minimum;
    a device's queue drained before and after)."""
    call = prog.bind(spec)
    args = prog.arguments(call, arrays)
    be.launch(call, args)
    best = float("inf")
    for _ in range(repeats):
        be.synchronize()
        t0 = time.perf_counter()
        be.launch(call, args)
        be.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def tune(batch_sizes: Iterable[int] = (64,), width: int = 64, generated: str | Path | None = None,
         progress: Callable[[str], None] | None = logging.getLogger(__name__).info, target: str = "c"):
    """Measure, record and rebuild (see the module docstring).  Returns the
    record's path, the record, and per kernel and sizes (direct ms, best ms)."""
    from vggen.compiler.emit import build
    from vggen.model.network import Network
    from vggen.paths import generated_dir
    from vggen.runtime import kernel_backend

    out_dir = Path(generated) if generated else generated_dir()
    be = kernel_backend(target, out_dir)        # the kernels there as they are now (after a tile tuning)
    measured: dict = {}
    summary = {}
    for batch in batch_sizes:
        if batch < 1:
            raise VggenError(f"--batch-size must be at least 1, got {batch}")
        net = Network(be, width=width, dropout=False, seed=0)
        found = list(network_choices(net, batch))
        for n, (direct, candidates, sizes, prog, arrays) in enumerate(found, 1):
            ms = {spec.algorithm: time_call(be, prog, spec, arrays) for spec in candidates}
            best = min(ms, key=ms.get)
            measured.setdefault(direct.name, []).append(
                {"sizes": sizes, "algorithm": best, "ms": {a: round(t, 3) for a, t in ms.items()}})
            summary[(direct.name, tuple(sizes.items()))] = (ms["direct"], ms[best])
            if progress:
                progress(f"[{n}/{len(found)}] B={batch} {direct.name} "
                         f"{', '.join(f'{k}={v}' for k, v in sizes.items())}: {best} "
                         f"({', '.join(f'{a} {t:.2f} ms' for a, t in ms.items())})")
    path = out_dir / RECORD_FILES[target]
    record = merge(load_records(path), be.device_name(), measured)
    write_atomic(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    build(out_dir)
    return path, record, summary


def format_table(record: dict) -> str:
    """The record as a Markdown table: per kernel and sizes, each algorithm's ms."""
    names = {"direct": "direct", "winograd2": "F(2×2, 3×3)", "winograd4": "F(4×4, 3×3)"}
    lines = ["| kernel | B | channels | H×W | " + " | ".join(names.values()) + " | fastest |",
             "|---|---|---|---|" + "---|" * (len(names) + 1)]
    for kernel, recs in record["kernels"].items():
        for r in sorted(recs, key=lambda r: (r["sizes"].get("B", 0), -r["sizes"].get("H", 0),
                                             r["sizes"].get("IC", 0), r["sizes"].get("OC", 0))):
            s = r["sizes"]
            cells = [f"{r['ms'][a]:.2f}" if a in r["ms"] else "—" for a in names]
            lines.append(f"| `{kernel}` | {s.get('B', '?')} | {s.get('IC', '?')}→{s.get('OC', '?')} | "
                         f"{s.get('H', '?')}×{s.get('W', '?')} | " + " | ".join(cells)
                         + f" | {names.get(r['algorithm'], r['algorithm'])} |")
    return "\n".join(lines)


__all__ = ["format_table", "network_choices", "time_call", "tune"]
