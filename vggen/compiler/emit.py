"""Emit C (OpenMP) and CUDA kernels from the kernel IR through Jinja2 templates.

``build()`` writes the VGG kernels (the seven layers of ``vgg_layers()``,
the compositions the network fuses, ``fused_layers()``, and the optimizer's
update, ``optim.sgd_momentum()``; forward and backward, specialised at K=1,
S=2, ε=2e-5):

* ``generated/c/vggen_kernels.c`` and ``vggen_kernels.h`` (one library);
* ``generated/cuda/<layer>.cu``, one self-contained file per layer;
  a contraction that is a matrix product runs as a tiled implicit GEMM
  (``cuda_contraction="tiled"``, the default: ``vggen.compiler.targets.cuda.schedule``),
  its thread/block schedule kept beside it as ``<name>_simple``
  (``CUDA_SIMPLE_SUFFIX``) for a fallback; ``"simple"`` emits only that
  one, under the kernel's own name;
* ``generated/manifest.json``: per kernel and target its name, layer,
  direction, class, file, source equations, signature (ordered arguments
  with dtype, access, role, shape and lower bounds as strings; the
  convention is in ``vggen/ir.py``), schedule, CUDA launch shape, and the
  sha256 of its emitted text.

Output is byte-for-byte reproducible (no timestamps, sorted keys, fixed
order) and written atomically; concurrent builds into one directory take
turns (an ``flock`` on ``<out>/.vggen.lock``, see ``build_lock``), so the
directory is always one build's whole output.  ``build(check=True)`` writes
nothing and returns the stale paths.  ``generate()`` renders any layers,
e.g. one not in VGG, with the same templates.

Templates (``templates/<target>/<class>.<ext>.j2``, one per kernel class)
hold loops, schedule and launch only; every expression is printed from the
IR by ``vggen.compiler.printers``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2
import sympy as sp

from vggen.atomic import write_atomic
from vggen.compiler.ir import (
    C_GEMM_BLOCKS,
    CUDA_RESIDENT_BLOCKS,
    CUDA_THREADS,
    Kernel,
    KernelClass,
    layer_slug,
    lower_network,
)
from vggen.compiler.printers import PRINTERS
from vggen.compiler.targets.c.coalesce import coalesce_rows
from vggen.compiler.targets.cuda import schedule as cuda_schedule
from vggen.compiler.targets.cuda.schedule import TUNING_FILE, TiledGemm, Tuning, load_tuning, tiled_gemm
from vggen.frontend.layers import BN_EPSILON
from vggen.paths import templates_dir

try:
    import fcntl
except ImportError:            # not POSIX: builds are not serialised
    fcntl = None

TEMPLATE_DIR = templates_dir()
VGG_SPECIALISE = {"K": 1, "S": 2, "epsilon": BN_EPSILON}
TARGETS = ("c", "cuda")
_EXT = {"c": "c", "cuda": "cu"}
C_SOURCE = "c/vggen_kernels.c"
C_HEADER = "c/vggen_kernels.h"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
LOCK = ".vggen.lock"           # in the output directory while a build writes (git-ignored)
_HELPERS = ("vg_imin", "vg_imax", "vg_select", "vg_floordiv", "vg_mod", "vg_block_sum", "vg_block_max", "vg_tile_choose")
# CUDA contraction schedule: "tiled" (implicit GEMM, vggen.compiler.targets.cuda.schedule; the
# simple one kept as <name>_simple) or "simple" (thread/block per output only)
CUDA_CONTRACTIONS = ("tiled", "simple")
CUDA_CONTRACTION = "tiled"
CUDA_SIMPLE_SUFFIX = "_simple"


@dataclass
class GeneratedKernel:
    """One kernel as emitted for one target."""

    ir: Kernel
    target: str
    text: str                      # the kernel's own code (comment + function; a tiled one's fallback too)
    tiled: TiledGemm | None = None  # CUDA: run as a tiled GEMM (its simple schedule is ``fallback``)

    @property
    def fallback(self) -> str | None:
        """The name of the simple-schedule copy of a tiled CUDA kernel."""
        return self.ir.name + CUDA_SIMPLE_SUFFIX if self.tiled is not None else None

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


# --------------------------------------------------------------------------- rendering


def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True, autoescape=False)


def printer(kernel: Kernel, target: str):
    """The kernel's printer: its tensors, its loop ranges (for the proofs), and
    in C's row mode the accumulator as an array element."""
    p = PRINTERS[target](kernel.tensors, kernel.ranges())
    sched = kernel.schedule
    if target == "c" and sched.row:
        (r,) = kernel.reductions
        v = kernel.parallel[-1]
        p.aliases[r.acc] = f"{r.acc.name}[{p.code(v.var - v.first)}]"
    return p


def comment(kernel: Kernel) -> list[str]:
    """The comment above a kernel: what it is, its source equations, how it runs."""
    lines = [f"{kernel.name}: {kernel.cls.value} ({kernel.layer}, {kernel.direction})"]
    lines += [f"  {eq}" for eq in kernel.equations]
    used = {str(k): v for k, v in kernel.specialise.items()}
    if used:
        lines.append("  specialised: " + ", ".join(f"{k}={_number(v)}" for k, v in sorted(used.items())))
    return lines


def render_kernel(kernel: Kernel, target: str, env: jinja2.Environment | None = None,
                  tiled: TiledGemm | None = None) -> str:
    """One kernel's code; with ``tiled`` (CUDA) the tiled GEMM under the
    kernel's name, then the simple schedule as ``<name>_simple``."""
    env = env or environment()
    if tiled is not None:
        simple = dataclasses.replace(kernel, name=kernel.name + CUDA_SIMPLE_SUFFIX)
        p = PRINTERS[target](kernel.tensors, {**kernel.ranges(), **tiled.ranges()})
        text = env.get_template("cuda/contraction_tiled.cu.j2").render(k=kernel, g=tiled, p=p, comment=comment(kernel))
        return _tidy(text) + render_kernel(simple, target, env)      # no empty line inside a kernel's text
    template = env.get_template(f"{target}/{kernel.cls.value}.{_EXT[target]}.j2")
    text = template.render(k=kernel, p=printer(kernel, target), comment=comment(kernel),
                           resident=CUDA_RESIDENT_BLOCKS)
    return _tidy(text)


def _tidy(text: str) -> str:
    # macros leave empty lines where their blocks end; a kernel has no intended one
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip()) + "\n"


def cuda_tiled(kernel: Kernel, cuda_contraction: str = CUDA_CONTRACTION,
               tuning: Tuning | None = None) -> TiledGemm | None:
    """The tiled schedule of a CUDA kernel, or None where it runs the simple
    one; with the choices ``tuning`` measured for it."""
    if cuda_contraction not in CUDA_CONTRACTIONS:
        raise ValueError(f"cuda_contraction must be one of {CUDA_CONTRACTIONS}, not {cuda_contraction!r}")
    if cuda_contraction != "tiled" or kernel.cls is not KernelClass.CONTRACTION:
        return None
    g = tiled_gemm(kernel)
    if g is not None and tuning is not None:
        g.tuned, g.tuned_on = tuning.for_kernel(kernel.name), tuning.device
    return g


def generate(layers, target: str, specialise: dict | None = None, *,
             cuda_contraction: str = CUDA_CONTRACTION,
             tuning: Tuning | None = None) -> tuple[str, list[GeneratedKernel]]:
    """Forward and backward kernels of ``layers`` for ``target`` ("c" or "cuda"):
    the source file's text and each kernel with its own text."""
    specialise = VGG_SPECIALISE if specialise is None else specialise
    return render(lower_network(list(layers), specialise), target, cuda_contraction=cuda_contraction,
                  tuning=tuning)


def render(kernels: list[Kernel], target: str, env: jinja2.Environment | None = None, *,
           cuda_contraction: str = CUDA_CONTRACTION,
           tuning: Tuning | None = None) -> tuple[str, list[GeneratedKernel]]:
    """One source file for ``target`` holding ``kernels`` (already lowered)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    env = env or environment()
    if target == "c":                      # short rows: one vector loop over the plane
        kernels = [coalesce_rows(k) for k in kernels]
    out = []
    for k in kernels:
        tiled = cuda_tiled(k, cuda_contraction, tuning) if target == "cuda" else None
        out.append(GeneratedKernel(k, target, render_kernel(k, target, env, tiled), tiled))
    what = ", ".join(dict.fromkeys(k.layer for k in kernels))
    # only the helpers the kernels call (an unused static function is a warning)
    used = {h for h in _HELPERS if any(f"{h}(" in g.text for g in out)}
    text = env.get_template(f"{target}/file.{_EXT[target]}.j2").render(
        kernels=[g.text for g in out], what=what, threads=CUDA_THREADS, used=used, tiled=cuda_schedule,
        blocks=[", ".join(f"{k} = {v}" for k, v in list(C_GEMM_BLOCKS.items())[i:i + 5])
                for i in range(0, len(C_GEMM_BLOCKS), 5)])
    return text, out


def header(kernels: list[GeneratedKernel], source: str = "vggen_kernels.c") -> str:
    """The C header declaring ``kernels``."""
    protos = []
    for g in kernels:
        p = printer(g.ir, "c")
        protos.append((g.name, comment(g.ir)[0], p.params(g.ir.args, restrict=False)))
    what = ", ".join(dict.fromkeys(g.ir.layer for g in kernels))
    return environment().get_template("c/header.h.j2").render(prototypes=protos, source=source, what=what)


# --------------------------------------------------------------------------- manifest


def _number(v):
    v = sp.sympify(v)
    return int(v) if v.is_Integer else float(v)


def _signature(kernel: Kernel) -> list[dict]:
    out = []
    for a in kernel.args:
        entry = {"name": a.name, "kind": a.kind, "dtype": a.dtype, "access": a.access}
        if a.tensor is not None:
            entry.update(role=a.tensor.role.value, shape=[str(s) for s in a.tensor.shape],
                         lower=[str(s) for s in a.tensor.lower], zero_outside=a.tensor.zero_outside)
        out.append(entry)
    return out


def _launch(kernel: Kernel, tiled: TiledGemm | None = None) -> dict:
    """CUDA launch shape: blockDim.x = threads (1-D blocks); gridDim.x from the
    sizes (a Python expression in the size names).  "thread" kernels take one
    thread per output element, "block" kernels one block per element
    (``parallel``: the output extents); all stride over the grid, so a capped
    grid is also correct.  "tiled" kernels (``tiled``) take a fixed grid
    (the blocks resident at once, ``grid_any``: any grid.x ≥ 1 is correct)
    and pick their tile configuration and k-splits themselves
    (vggen.compiler.targets.cuda.schedule.launch adds what they need); so do split reductions
    (``Kernel.cuda_split``), which share that grid out over their outputs."""
    total = sp.Mul(*[lp.extent for lp in kernel.parallel])
    if kernel.cuda_split and tiled is None:
        grid = str(CUDA_RESIDENT_BLOCKS)
    elif kernel.schedule.cuda == "block":
        grid = str(total)
    else:
        grid = f"({total} + {CUDA_THREADS - 1}) // {CUDA_THREADS}"
    out = {"mode": kernel.schedule.cuda, "threads": CUDA_THREADS, "block": [CUDA_THREADS, 1, 1],
           "grid": [grid, "1", "1"], "parallel": [str(lp.extent) for lp in kernel.parallel],
           "elements": str(total), "dynamic_shared_bytes": 0}
    if kernel.cuda_split and tiled is None:
        # any grid is correct; this one shares its blocks out over the outputs
        out.update(grid_any=True, split_reduction={
            "workspace": f"vg_rws_{kernel.name}", "counters": f"vg_rcount_{kernel.name}",
            "scope": "the kernel's own: launches of it must not run concurrently"})
    if tiled is not None:
        out.update(cuda_schedule.launch(tiled, kernel.name))
    return out


def manifest_entry(g: GeneratedKernel, file: str) -> dict:
    k = g.ir
    entry = {
        "name": k.name, "target": g.target, "layer": k.layer, "direction": k.direction,
        "class": k.cls.value, "file": file, "equations": k.equations,
        "signature": _signature(k),
        "reads": [t.name for t in k.reads], "writes": [t.name for t in k.writes],
        "sizes": [s.name for s in k.sizes],
        "specialise": {str(s): _number(v) for s, v in sorted(k.specialise.items(), key=lambda kv: str(kv[0]))},
        "sha256": g.sha256,
    }
    if g.target == "cuda":
        entry["launch"] = _launch(k, g.tiled)
        if k.cls is KernelClass.CONTRACTION:
            entry["cuda_contraction"] = "tiled" if g.tiled is not None else "simple"
        if g.tiled is not None:
            # the same signature and arguments, the thread/block schedule (no workspace)
            entry["fallback"] = {"name": g.fallback, "launch": _launch(k)}
    else:
        entry["schedule"] = {"vector_loop": str(k.schedule.vector), "row_accumulator": k.schedule.row,
                             "interior_split": k.schedule.c_region is not None,
                             "loops": [lp.var.name for lp in k.parallel]}
        gm = k.schedule.gemm
        if gm is not None:
            entry["schedule"]["gemm"] = {
                "m": [lp.var.name for lp in gm.m], "n": [lp.var.name for lp in gm.n],
                "k": [lp.var.name for lp in gm.k],
                "forms": ["outer", "inner"] if gm.inner else ["outer"],
                "blocks": dict(C_GEMM_BLOCKS),
            }
    return entry


_CONVENTION = ("arguments: pointers to the tensors read (sorted by name), then to the tensors written "
               "(sorted by name), then int sizes (sorted by name); float32 tensors are float*, int tensors "
               "int32; dense row-major, shape as listed, first index per dimension = lower (subtracted by "
               "the kernel); every element of a written tensor is written.  CUDA: extern \"C\" kernels, "
               "launch with launch.block and launch.grid (Python expressions in the sizes).")


# --------------------------------------------------------------------------- build


def generated_layers() -> list:
    """Every layer ``build`` generates kernels for: the network's (``network_layers``),
    and the in-place updates of a training step: BatchNormalization's running
    statistics and the optimizer's (``optim.sgd_momentum``)."""
    from vggen.frontend.layers import batch_normalization_running, network_layers
    from vggen.frontend.updates import sgd_momentum

    return network_layers() + [batch_normalization_running(), sgd_momentum()]


def outputs(layers=None, specialise: dict | None = None, *,
            cuda_contraction: str = CUDA_CONTRACTION, tuning: Tuning | None = None) -> dict[str, str]:
    """Every file ``build`` writes: path relative to the output dir → text
    (``tuning``: the measured tile choices compiled into the CUDA kernels)."""
    layers = generated_layers() if layers is None else list(layers)
    specialise = VGG_SPECIALISE if specialise is None else specialise
    files: dict[str, str] = {}
    entries = []
    env = environment()
    kernels = lower_network(layers, specialise)
    c_text, c_kernels = render(kernels, "c", env)
    files[C_SOURCE] = c_text
    files[C_HEADER] = header(c_kernels)
    entries += [manifest_entry(g, C_SOURCE) for g in c_kernels]
    for layer in layers:
        path = f"cuda/{layer_slug(layer.name)}.cu"
        if path in files:
            raise ValueError(f"two layers would write {path}")
        cu_text, cu_kernels = render([k for k in kernels if k.layer == layer.name], "cuda", env,
                                     cuda_contraction=cuda_contraction, tuning=tuning)
        files[path] = cu_text
        entries += [manifest_entry(g, path) for g in cu_kernels]
    manifest = {
        "generator": "vggen.compiler.emit", "version": MANIFEST_VERSION, "convention": _CONVENTION,
        "specialise": {str(k): v for k, v in specialise.items()},
        "cuda_threads": CUDA_THREADS,
        "cuda_contraction": cuda_contraction,
        "tuning": ({"file": TUNING_FILE, "device": tuning.device} if tuning is not None and tuning.kernels
                   else None),
        "files": {path: hashlib.sha256(text.encode()).hexdigest() for path, text in files.items()},
        "kernels": entries,
    }
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return dict(sorted(files.items()))


def _ours(out: Path) -> list[Path]:
    """Files in ``out`` that a build owns (to spot leftovers of removed kernels)."""
    found = [out / MANIFEST] if (out / MANIFEST).exists() else []
    for sub, exts in (("c", (".c", ".h")), ("cuda", (".cu",))):
        d = out / sub
        if d.is_dir():
            found += [f for f in sorted(d.iterdir()) if f.is_file() and f.suffix in exts]
    return found


def build(out_dir="generated", check: bool = False, *, cuda_contraction: str = CUDA_CONTRACTION) -> list[Path]:
    """Write the VGG kernels and manifest under ``out_dir``; returns every path
    of the build (files whose bytes are already right are left untouched;
    leftover kernel files of ours are removed).

    ``check=True`` writes nothing and returns the stale paths instead: files
    missing, differing from what a build would write, or left over.  Empty
    means up to date.  ``cuda_contraction``: see ``CUDA_CONTRACTION``.
    ``out_dir/tuning.json`` (``vggen tune``), where present, is an input:
    its measured tile choices are compiled into the tiled CUDA kernels.
    """
    out = Path(out_dir)
    options = {} if cuda_contraction == CUDA_CONTRACTION else {"cuda_contraction": cuda_contraction}
    tuning = load_tuning(out / TUNING_FILE)
    if tuning is not None:
        options["tuning"] = tuning
    files = {out / rel: text.encode() for rel, text in outputs(**options).items()}
    if check:
        leftovers = [f for f in _ours(out) if f not in files]
        stale = [p for p, data in files.items() if not p.is_file() or p.read_bytes() != data]
        return sorted(stale + leftovers)
    with build_lock(out):
        leftovers = [f for f in _ours(out) if f not in files]
        for path, data in files.items():
            if not path.is_file() or path.read_bytes() != data:
                write_atomic(path, data)
        for f in leftovers:
            f.unlink()
    return list(files)


@contextlib.contextmanager
def build_lock(out: Path):
    """Hold the exclusive inter-process lock of output directory ``out``
    (created if missing) while writing into it.

    The lock is an ``flock`` on ``out/.vggen.lock``.  The holder removes the
    file before releasing it, so a finished build leaves nothing behind; a
    waiter that then gets the lock on the removed file sees that the path no
    longer names it and tries again on the current one.  A file left by a
    killed build is harmless (the kernel dropped its lock), is not one of the
    build's outputs (``check`` and the manifest ignore it) and is git-ignored.
    """
    if fcntl is None:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            fd = None                  # a read-only directory: only a build with nothing to write succeeds
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            now = os.stat(path)
        except FileNotFoundError:      # removed by the holder we waited for
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)                   # replaced by a newer lock file: wait on that one
    if fd is None:
        yield
        return
    try:
        yield
    finally:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finally:
            os.close(fd)               # releases the lock


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vggen.compiler.emit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="generated", help="output directory (default: generated)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if any file is stale")
    ap.add_argument("--cuda-contraction", choices=CUDA_CONTRACTIONS, default=CUDA_CONTRACTION,
                    help="CUDA contraction schedule (default: %(default)s; tiled keeps <name>_simple beside)")
    args = ap.parse_args(argv)
    if args.check:
        stale = build(args.out, check=True, cuda_contraction=args.cuda_contraction)
        for p in stale:
            print(f"stale: {p}")
        return 1 if stale else 0
    for p in build(args.out, cuda_contraction=args.cuda_contraction):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
