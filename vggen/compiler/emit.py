"""Emit C (OpenMP) and CUDA kernels from the kernel IR through Jinja2 templates.

``build()`` writes the VGG kernels (the seven layers of ``vgg_layers()``,
the compositions the network fuses, ``fused_layers()``, and the optimizer's
update, ``optim.sgd_momentum()``; forward and backward, specialised at K=1,
S=2, ε=2e-5):

* ``generated/c/vggen_kernels.c`` and ``vggen_kernels.h`` (one library);
* ``generated/cuda/<layer>.cu``, one self-contained file per layer;
  a contraction that is a matrix product runs as a tiled implicit GEMM
  (``cuda_contraction="tiled"``, the default: ``vggen.compiler.targets.cuda.schedule``),
  its thread/block schedule kept beside it as ``<name>_simple`` for a
  fallback; ``"simple"`` emits only that one, under the kernel's own name
  (``vggen.compiler.targets.cuda.target``);
* ``generated/manifest.json``: per kernel and target its name, layer,
  direction, class, file, source equations, signature (ordered arguments
  with dtype, access, role, shape and lower bounds as strings; the
  convention is in ``vggen/compiler/ir.py``), schedule, CUDA launch shape, and the
  sha256 of its emitted text.

Output is byte-for-byte reproducible (no timestamps, sorted keys, fixed
order) and written atomically; concurrent builds into one directory take
turns (an ``flock`` on ``<out>/.vggen.lock``, see ``build_lock``), so the
directory is always one build's whole output.  ``build(check=True)`` writes
nothing and returns the stale paths.  ``generate()`` renders any layers,
e.g. one not in VGG, with the same templates.

The kernels come from ``vggen.compiler.pipeline``; each target
(``vggen.compiler.targets.base.Target``: C, CUDA) schedules, prints and
renders them; this module drives both through that one interface and
writes the files.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import sys
from pathlib import Path

import jinja2

from vggen.atomic import write_atomic
from vggen.compiler.ir import Kernel, layer_slug
from vggen.compiler.measured import RECORD_FILES, load_records
from vggen.compiler.pipeline import lower_network
from vggen.compiler.targets.base import GeneratedKernel, Target, environment, number
from vggen.compiler.targets.c.target import CTarget
from vggen.compiler.targets.cuda.constants import THREADS as CUDA_THREADS
from vggen.compiler.targets.cuda.schedule import TUNING_FILE, Tuning, load_tuning
from vggen.compiler.targets.cuda.target import CONTRACTIONS as CUDA_CONTRACTIONS
from vggen.compiler.targets.cuda.target import CudaTarget
from vggen.errors import VggenError
from vggen.frontend.layers import BN_EPSILON
from vggen.paths import templates_dir

try:
    import fcntl
except ImportError:            # not POSIX: builds are not serialised
    fcntl = None

TEMPLATE_DIR = templates_dir()    # templates/<target>/<class>.<ext>.j2
VGG_SPECIALISE = {"K": 1, "S": 2, "epsilon": BN_EPSILON}
TARGETS = ("c", "cuda")
C_SOURCE = "c/vggen_kernels.c"
C_HEADER = "c/vggen_kernels.h"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
LOCK = ".vggen.lock"           # in the output directory while a build writes (git-ignored)
# CUDA contraction schedule: "tiled" (implicit GEMM, vggen.compiler.targets.cuda.schedule; the
# simple one kept as <name>_simple) or "simple" (thread/block per output only)
CUDA_CONTRACTION = "tiled"


# --------------------------------------------------------------------------- rendering


def get_target(name: str, *, cuda_contraction: str = CUDA_CONTRACTION, tuning: Tuning | None = None) -> Target:
    """The target called ``name`` ("c" or "cuda"), with the CUDA options."""
    if name not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {name!r}")
    return CTarget() if name == "c" else CudaTarget(cuda_contraction, tuning)


def generate(layers, target: str, specialise: dict | None = None, *,
             cuda_contraction: str = CUDA_CONTRACTION,
             tuning: Tuning | None = None) -> tuple[str, list[GeneratedKernel]]:
    """Forward and backward kernels of ``layers`` for ``target`` ("c" or "cuda"):
    the source file's text and each kernel with its own text."""
    specialise = VGG_SPECIALISE if specialise is None else specialise
    return render(lower_network(list(layers), specialise), target, cuda_contraction=cuda_contraction,
                  tuning=tuning)


def render(kernels: list[Kernel], target_name: str, env: jinja2.Environment | None = None, *,
           cuda_contraction: str = CUDA_CONTRACTION,
           tuning: Tuning | None = None) -> tuple[str, list[GeneratedKernel]]:
    """One source file for the target ``target_name`` holding ``kernels`` (already lowered)."""
    tgt = get_target(target_name, cuda_contraction=cuda_contraction, tuning=tuning)
    env = env or environment()
    kernels = tgt.prepare(kernels)
    out = []
    for k in kernels:
        out.append(tgt.render_kernel(k, env))
        out += tgt.variants(k, env)
    what = ", ".join(dict.fromkeys(k.layer for k in kernels))
    return tgt.render_file(out, what, env), out


# --------------------------------------------------------------------------- manifest


def _signature(kernel: Kernel) -> list[dict]:
    out = []
    for a in kernel.args:
        entry = {"name": a.name, "kind": a.kind, "dtype": a.dtype, "access": a.access}
        if a.tensor is not None:
            entry.update(role=a.tensor.role.value, shape=[str(s) for s in a.tensor.shape],
                         lower=[str(s) for s in a.tensor.lower], zero_outside=a.tensor.zero_outside)
        out.append(entry)
    return out


def manifest_entry(g: GeneratedKernel, file: str) -> dict:
    k = g.ir
    entry = {
        "name": k.name, "target": g.target, "layer": k.layer, "direction": k.direction,
        "class": k.cls.value, "file": file, "equations": k.equations,
        "signature": _signature(k),
        "reads": [t.name for t in k.reads], "writes": [t.name for t in k.writes],
        "sizes": [s.name for s in k.sizes],
        "specialise": {str(s): number(v) for s, v in sorted(k.specialise.items(), key=lambda kv: str(kv[0]))},
        "sha256": g.sha256,
    }
    if g.algorithm is not None:
        entry["algorithm"] = g.algorithm
    if g.definitions:
        entry["calls"] = sorted(g.definitions)      # defined once in its file (the Winograd transforms)
    entry.update(get_target(g.target).manifest(g))
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
            cuda_contraction: str = CUDA_CONTRACTION, tuning: Tuning | None = None,
            measured: dict | None = None) -> dict[str, str]:
    """Every file ``build`` writes: path relative to the output dir → text
    (``tuning``: the measured tile choices compiled into the CUDA kernels;
    ``measured``: per target, the algorithm choices ``vggen tune`` recorded,
    listed in the manifest beside the kernels they are for)."""
    layers = generated_layers() if layers is None else list(layers)
    specialise = VGG_SPECIALISE if specialise is None else specialise
    files: dict[str, str] = {}
    entries = []
    env = environment()
    kernels = lower_network(layers, specialise)
    c_text, c_kernels = render(kernels, "c", env)
    files[C_SOURCE] = c_text
    files[C_HEADER] = CTarget().header(c_kernels, env)
    entries += [manifest_entry(g, C_SOURCE) for g in c_kernels]
    for layer in layers:
        path = f"cuda/{layer_slug(layer.name)}.cu"
        if path in files:
            raise ValueError(f"two layers would write {path}")
        cu_text, cu_kernels = render([k for k in kernels if k.layer == layer.name], "cuda", env,
                                     cuda_contraction=cuda_contraction, tuning=tuning)
        files[path] = cu_text
        entries += [manifest_entry(g, path) for g in cu_kernels]
    measured = {t: rec for t, rec in (measured or {}).items() if rec["kernels"]}
    for entry in entries:
        recs = measured.get(entry["target"], {"kernels": {}})["kernels"].get(entry["name"])
        if recs:
            entry["measured"] = recs
    manifest = {
        "generator": "vggen.compiler.emit", "version": MANIFEST_VERSION, "convention": _CONVENTION,
        "specialise": {str(k): v for k, v in specialise.items()},
        "cuda_threads": CUDA_THREADS,
        "cuda_contraction": cuda_contraction,
        "tuning": ({"file": TUNING_FILE, "device": tuning.device} if tuning is not None and tuning.kernels
                   else None),
        "algorithms": {t: {"file": RECORD_FILES[t], "device": rec["device"]} for t, rec in sorted(measured.items())},
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
    its measured tile choices are compiled into the tiled CUDA kernels;
    ``out_dir/algorithms.json`` and ``algorithms-cuda.json`` (``vggen tune``)
    likewise list the measured algorithm choices in the manifest.
    """
    out = Path(out_dir)
    options = {} if cuda_contraction == CUDA_CONTRACTION else {"cuda_contraction": cuda_contraction}
    tuning = load_tuning(out / TUNING_FILE)
    if tuning is not None:
        options["tuning"] = tuning
    measured = {t: load_records(out / f) for t, f in RECORD_FILES.items()}
    if any(rec["kernels"] for rec in measured.values()):
        options["measured"] = measured
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
            try:
                f.unlink()
            except OSError as e:
                raise VggenError(f"cannot remove the leftover kernel file {f}: {e.strerror or e}") from None
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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VggenError(f"cannot create {out}: {e.strerror or e}") from None
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
