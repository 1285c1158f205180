"""A layer as an op: ``vggen.compile(layer, target)`` derives, lowers, emits
and loads it in one call, and runs it on arrays by tensor name.

    op = vggen.compile(layer, "c")
    out = op.forward(x=x, w=w)                    # {"y": ..., and any saved intermediates}
    grads = op.backward(g_y=g_y, x=x, w=w)        # {"g_x": ..., "g_w": ...}

The kernels come from the same passes and templates as ``vggen build``:
``derive`` gives the backward, ``vggen.compiler.emit.outputs`` lowers and
renders both directions into C, CUDA and a manifest of their own, and the
target's backend (``vggen.runtime``) checks that directory against its
manifest, compiles and runs it.  The ``numpy`` target evaluates the
equations themselves in float64 (the reference) and emits nothing.

The cache (under :func:`vggen.paths.cache_dir`):

* ``ops/<sha256>/``: one emitted op, named by the SHA-256 of its files.  It
  is written into a temporary directory beside it and renamed into place, so
  a reader sees a whole op or none; a concurrent compile of the same op that
  loses the race uses the winner's (same name, same bytes).  A directory
  whose files no longer hash to its name is replaced.
* ``ops/by-layer/<key>``: the name of a layer's op directory, ``key`` the
  SHA-256 of the layer's tensors and equations, the sizes fixed at compile
  time, and vggen's own sources and templates (any edit to the compiler
  changes every key).  A hit skips lowering and rendering; the C library is
  then found in the library cache (:mod:`vggen.runtime.c`) by its sources.

Sizes are read from the arrays' shapes at each call (a disagreement is a
one-line :class:`VggenError` naming the tensor and the dimension); sizes
that the shapes cannot tell (a pooling stride S when only ``x`` of extent
``S·HO`` is given) are fixed at compile time with ``sizes={"S": 2}`` and
compiled into the kernels, as are constants (``epsilon``).
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import sympy as sp

from vggen.atomic import fsync_directory, remove_dead_writers, write_atomic
from vggen.errors import VggenError
from vggen.frontend.lang import Layer, Role, Tensor
from vggen.paths import PACKAGE, cache_dir, templates_dir
from vggen.runtime.numpy import NumpyBackend, NumpyProgram

TARGETS = ("c", "cuda", "numpy")
OPS = "ops"
BY_LAYER = "by-layer"
KEY_VERSION = "vggen-op-1"
# a temporary or discarded op directory: .<sha256>.<pid>.<hex>.(tmp|old)
_TEMPORARY = re.compile(r"\.[0-9a-f]{64}\.(\d+)\.[0-9a-f]+\.(tmp|old)")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- compile


def compile(layer: Layer, target: str = "c", sizes: Mapping | None = None) -> Op:  # noqa: A001
    """``layer`` compiled for ``target`` ("c", "cuda" or "numpy"): an :class:`Op`.

    ``sizes``: sizes fixed at compile time (window sizes such as ``K``,
    ``S``) and constants (``epsilon``), by name; they are compiled into the
    kernels.  Every other size is read from the arrays at each call.
    """
    if not isinstance(layer, Layer):
        raise VggenError(f"vggen.compile: expected a vggen Layer, got {type(layer).__name__}")
    if target not in TARGETS:
        raise VggenError(f"vggen.compile: unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    if layer.direction != "forward":
        raise VggenError(f"vggen.compile: {layer.name} is a derived program; compile its forward layer")
    fixed = _fixed_sizes(layer, sizes or {})
    key = layer_key(layer, fixed)
    memo_key = (key, target, str(cache_dir()))
    memo = _OPS.get(memo_key) if key else None
    if memo is not None:
        return memo
    backward = _backward_program(layer)
    directory = None
    if target == "numpy":
        backend = Float64NumpyBackend()
    else:
        directory = emitted(layer, fixed, key)
        if target == "c":
            from vggen.runtime.c import CBackend
            backend = CBackend(generated=directory)
        else:
            from vggen.runtime.cuda import CudaBackend
            backend = CudaBackend(generated=directory)
    op = Op(layer, backward, backend, target, fixed, directory)
    if key:
        _OPS[memo_key] = op
    return op


# (layer key, target, cache directory) -> Op: a second compile in this process is a lookup
_OPS: dict = {}


def _fixed_sizes(layer: Layer, sizes: Mapping) -> dict:
    """Symbol -> value for the compile-time ``sizes`` (names or symbols)."""
    by_name = {s.name: s for s in set(layer.constants) | layer.size_symbols}
    out = {}
    for key, value in sizes.items():
        name = key.name if isinstance(key, sp.Symbol) else str(key)
        sym = by_name.get(name)
        if sym is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise VggenError(f"layer {layer.name}: no size or constant named {name} (it has {known})")
        if sym in layer.constants:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise VggenError(f"layer {layer.name}: constant {name} must be a number, got {value!r}")
            out[sym] = float(value)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise VggenError(f"layer {layer.name}: size {name} must be a positive integer, got {value!r}")
            out[sym] = int(value)
    return out


def _backward_program(layer: Layer) -> Layer | None:
    """The derived backward, reduced to the tensors its equations read or write
    (so that a caller gives only what the backward needs)."""
    if not layer.differentiable_inputs:
        return None
    from vggen.derive.autodiff import derive

    program = derive(layer).program
    read = {str(a.base.label) for eq in program.equations for a in eq.rhs.atoms(sp.Indexed)}
    tensors = [t for t in program.tensors if t.role.is_computed or t.name in read]
    return Layer(program.name, tensors, list(program.equations), constants=program.constants,
                 doc=program.doc, direction=program.direction)


# --------------------------------------------------------------------------- the op


class Op:
    """A compiled layer.  ``forward(**inputs)`` and ``backward(**seeds_and_saved)``
    take arrays by tensor name and return dicts by tensor name.

    * ``inputs``: the forward's inputs and parameters, in the layer's declared order;
    * ``outputs``: what the forward hands on; ``saved``: the intermediates it
      also returns (every computed tensor is returned);
    * ``backward_inputs``: the seeds ``g_<output>`` (``seeds``) and the forward
      tensors the backward reads; ``gradients``: ``g_<input>`` for every
      differentiable input and parameter.

    Arrays: NumPy on c (float32) and numpy (float32 or float64, computed and
    returned in float64), CuPy (or NumPy, copied over) on cuda (float32).
    Integer tensors take any integer dtype (converted to int32).
    """

    def __init__(self, layer: Layer, backward: Layer | None, backend, target: str,
                 fixed: dict, directory: Path | None):
        self.layer, self.backward_layer, self.backend = layer, backward, backend
        self.target, self.fixed, self.directory = target, fixed, directory
        self.inputs = tuple(t.name for t in layer.tensors if not t.role.is_computed)
        self.outputs = tuple(t.name for t in layer.outputs)
        self.saved = tuple(t.name for t in layer.tensors if t.role is Role.SAVED)
        self.seeds = tuple(f"g_{n}" for n in self.outputs)
        if backward is None:
            self.backward_inputs, self.gradients = (), ()
        else:
            self.backward_inputs = tuple(t.name for t in backward.tensors if not t.role.is_computed)
            self.gradients = tuple(t.name for t in backward.tensors if t.role is Role.GRADIENT)
        self.differentiable = tuple(t.name for t in layer.differentiable_inputs)
        self.float_dtype = np.dtype(np.float64 if target == "numpy" else np.float32)
        # the tensor whose shape each given name has (a seed g_y: y's)
        self._shape_of = {t.name: t for t in layer.tensors}
        self._shape_of.update({f"g_{t.name}": t for t in layer.outputs})
        self._sizes: dict = {}

    @property
    def name(self) -> str:
        return self.layer.name

    def __repr__(self):
        return f"<vggen op {self.layer.name} on {self.target}: {', '.join(self.inputs)} -> {', '.join(self.outputs)}>"

    # ---- running
    def forward(self, **inputs) -> dict:
        """Every computed tensor of the forward (outputs and saved intermediates), by name.
        A state tensor (an in-place update) is written back into the array given for it."""
        program, arrays = self.bind("forward", inputs)
        computed = program(arrays)
        for t in self.layer.role(Role.STATE):
            given, used = inputs[t.name], arrays[t.name]
            if used is not given and hasattr(given, "shape"):    # converted on the way in: copy back
                given[...] = self.backend.to_host(used) if isinstance(given, np.ndarray) else used
        return computed

    def backward(self, **given) -> dict:
        """``g_<input>`` for every differentiable input and parameter, by name.

        ``given``: the seeds and the forward tensors the backward reads
        (``backward_inputs``); any other forward tensor may be given too, and
        is used for its shape only."""
        program, arrays = self.bind("backward", given)
        return program(arrays)

    def bind(self, which: str, arrays: Mapping[str, Any]):
        """(the backend's program for these shapes, the arrays checked and converted):
        call the program with the arrays, and with arrays of its ``shapes`` and
        ``dtypes`` for the tensors it computes, to have it write into those."""
        layer, wanted = self._direction(which)
        # the backward may be given forward tensors it does not read: their
        # shapes tell sizes its own arrays cannot (a pooling's H from x)
        shape_only = [n for n in arrays if n not in wanted and which == "backward"
                      and n in self._shape_of]
        unknown = [n for n in arrays if n not in wanted and n not in shape_only]
        if unknown:
            raise VggenError(f"layer {self.name}: {which} takes {', '.join(wanted) or 'nothing'}; "
                             f"got unknown {', '.join(unknown)}")
        missing = [n for n in wanted if n not in arrays]
        if missing:
            raise VggenError(f"layer {self.name}: {which} needs {', '.join(wanted)}; "
                             f"missing {', '.join(missing)}")
        converted = {n: self._array(n, layer.tensor(n), arrays[n]) for n in wanted}
        shapes = {n: tuple(a.shape) for n, a in converted.items()}
        shapes.update({n: tuple(getattr(arrays[n], "shape", None) or np.shape(arrays[n]))
                       for n in shape_only})
        sizes = self.sizes_of(which, shapes)
        return self.backend.program(layer, sizes), converted

    def _direction(self, which: str) -> tuple[Layer, tuple]:
        if which == "forward":
            return self.layer, self.inputs
        if which != "backward":
            raise VggenError(f"layer {self.name}: no direction {which!r} (forward or backward)")
        if self.backward_layer is None:
            raise VggenError(f"layer {self.name} has no differentiable input or parameter: no backward")
        return self.backward_layer, self.backward_inputs

    def _array(self, name: str, tensor: Tensor, a):
        """``a`` as the backend's contiguous array of the tensor's dtype, or a one-line error."""
        xp = self.backend.xp
        kind = "integer" if tensor.dtype == "int" else "float"
        if not isinstance(a, getattr(self.backend, "array_type", np.ndarray)):
            if self.target == "cuda" and isinstance(a, np.ndarray):
                a = xp.asarray(a)
            elif type(a).__module__.split(".")[0] == "cupy":
                raise VggenError(f"layer {self.name}: {name} is a CuPy array; the {self.target} "
                                 f"target runs on the CPU: pass a NumPy array")
            else:
                try:
                    a = np.asarray(a)
                except Exception as e:      # a tensor that requires grad, a ragged list...
                    raise VggenError(f"layer {self.name}: {name} is no array ({type(a).__name__}: {e})") \
                        from None
                if a.dtype == object:
                    raise VggenError(f"layer {self.name}: {name} is no numeric array")
        dtype = np.dtype(a.dtype)
        if kind == "integer":
            if dtype.kind not in "iu":
                raise VggenError(f"layer {self.name}: {name} is {dtype}; it holds integers (any int dtype)")
            want = np.dtype(np.int32)
        else:
            if dtype.kind not in "f":
                raise VggenError(f"layer {self.name}: {name} is {dtype}; it is a float tensor")
            if self.target != "numpy" and dtype != np.float32:
                raise VggenError(f"layer {self.name}: {name} is {dtype}; the {self.target} target's "
                                 f"kernels are float32: pass float32 arrays, or use target 'numpy'")
            want = self.float_dtype
        return xp.ascontiguousarray(a, dtype=want)

    # ---- sizes
    def sizes_of(self, which: str, shapes: Mapping[str, tuple]) -> dict:
        """Every size of the ``which`` program, by name, read from the given ``shapes``
        (and the sizes fixed at compile time)."""
        key = (which, tuple(sorted(shapes.items())))
        found = self._sizes.get(key)
        if found is None:
            layer, _ = self._direction(which)
            given = [(n, self._shape_of[n].shape, shapes[n]) for n in shapes]
            needed = {s for s in layer.size_symbols if s not in layer.constants}
            found = infer_sizes(self.name, given, self.fixed, needed)
            self._sizes[key] = found
        return found


class UntoldSizes(VggenError):
    """Sizes that the given shapes do not tell (``names``): a caller with its own
    way of fixing them (a model file's NAME=VALUE) words its own advice."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


def infer_sizes(layer: str, given: list[tuple[str, tuple, tuple]], fixed: dict, needed: set) -> dict:
    """Size name -> value from ``given`` (tensor name, symbolic shape, array shape).

    A dimension that is one size symbol gives it; a compound one (``2K+1``,
    ``S·HO``) is solved once every other symbol in it is known.  Every
    dimension must agree with the sizes found: else a VggenError naming the
    tensor, the dimension and where the other value came from.
    """
    known: dict = {s: sp.Integer(v) for s, v in fixed.items() if not isinstance(v, float)}
    source = {s: "compile(sizes=...)" for s in known}
    pending = []
    for name, exprs, shape in given:
        if len(exprs) != len(shape):
            want = ", ".join(str(e) for e in exprs)
            raise VggenError(f"layer {layer}: {name} has rank {len(exprs)} ({want}), "
                             f"got an array of shape {tuple(shape)}")
        pending += [(name, d, sp.sympify(e), int(n)) for d, (e, n) in enumerate(zip(exprs, shape))]
    while pending:
        progress = False
        for item in list(pending):          # plain symbols first: they name the sizes
            name, d, e, n = item
            if isinstance(e, sp.Symbol) and e not in known:
                if n < 1:
                    raise VggenError(f"layer {layer}: {name} dimension {d} ({e}) is empty")
                known[e], source[e] = sp.Integer(n), f"{name} dimension {d}"
                pending.remove(item)
                progress = True
        for item in list(pending):          # then every dimension that is fully known is checked
            name, d, e, n = item
            v = e.xreplace(known)
            if v.free_symbols:
                continue
            if v != n:
                used = ", ".join(f"{s} = {known[s]} from {source[s]}"
                                 for s in sorted(e.free_symbols, key=lambda s: s.name))
                why = f"{e} = {v} from {source[e]}" if isinstance(e, sp.Symbol) else f"{e} = {v} with {used}"
                raise VggenError(f"layer {layer}: {name} dimension {d} ({e}) has {n} elements, but {why}")
            pending.remove(item)
            progress = True
        if progress:
            continue
        for item in pending:                # then a compound dimension with one unknown
            name, d, e, n = item
            v = e.xreplace(known)
            if len(v.free_symbols) != 1:
                continue
            (sym,) = v.free_symbols
            roots = [r for r in sp.solve(sp.Eq(v, n), sym) if r.is_Integer and r > 0]
            if len(roots) != 1:
                raise VggenError(f"layer {layer}: {name} dimension {d} ({e}) has {n} elements, "
                                 f"which {e} is for no positive integer {sym}")
            known[sym], source[sym] = roots[0], f"{name} dimension {d}"
            pending.remove(item)
            progress = True
            break
        if not progress:
            break
    unknown = sorted({s.name for *_, e, _ in pending for s in e.free_symbols if s not in known}
                     | {s.name for s in needed if s not in known})
    if unknown:
        example = ", ".join(f"'{u}': ..." for u in unknown)
        raise UntoldSizes(f"layer {layer}: the shapes of {', '.join(n for n, _, _ in given) or 'nothing'} "
                          f"do not tell {', '.join(unknown)}: fix "
                          f"{'it' if len(unknown) == 1 else 'them'} with vggen.compile(..., sizes={{{example}}})",
                          unknown)
    out = {s.name: int(v) for s, v in known.items()}
    out.update({s.name: v for s, v in fixed.items()})
    return out


class Float64Program(NumpyProgram):
    """The reference program taking and giving float64 arrays (gradient checks need it)."""

    def __init__(self, backend, layer, sizes):
        super().__init__(backend, layer, sizes)
        self.dtypes = {n: (np.dtype(np.float64) if d.kind == "f" else d) for n, d in self.dtypes.items()}


class Float64NumpyBackend(NumpyBackend):
    """The numpy target in float64 end to end (the shared one takes float32)."""

    def _prepare(self, layer, sizes):
        return Float64Program(self, layer, sizes)


# --------------------------------------------------------------------------- the cache


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 of vggen's Python sources and templates, and the versions of the
    libraries that shape the emitted text: part of every layer key."""
    import jinja2

    h = hashlib.sha256(f"{KEY_VERSION}\0sympy {sp.__version__}\0jinja2 {jinja2.__version__}\0".encode())
    for root, pattern in ((PACKAGE, "*.py"), (templates_dir(), "*")):
        for path in sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts):
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def layer_key(layer: Layer, fixed: dict) -> str | None:
    """SHA-256 of everything the emitted op depends on, or None when the layer
    holds SymPy dummies (named afresh in every process: no stable key)."""
    parts = [code_fingerprint(), layer.name, layer.direction]
    for t in layer.tensors:
        parts.append(repr((t.name, sp.srepr(t.shape), t.role.value, t.zero_outside, sp.srepr(t.lower),
                           t.dtype, t.differentiable)))
    for eq in layer.equations:
        parts.append(repr((sp.srepr(eq.lhs), sp.srepr(eq.rhs), eq.label)))
    parts.append(repr(sorted((sp.srepr(k), repr(v)) for k, v in layer.constants.items())))
    parts.append(repr(sorted((s.name, repr(v)) for s, v in fixed.items())))
    text = "\0".join(parts)
    if "Dummy(" in text:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def files_hash(files: Mapping[str, str]) -> str:
    """The name of an op directory: SHA-256 over its files' paths and bytes."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel].encode()).digest())
    return h.hexdigest()


def _intact(directory: Path) -> bool:
    """Whether ``directory`` holds the whole op its name promises (its manifest
    and every file the manifest lists, hashing to the directory's name)."""
    try:
        manifest = (directory / "manifest.json").read_text(encoding="utf-8")
        listed = json.loads(manifest).get("files", {})
        files = {rel: (directory / rel).read_text(encoding="utf-8") for rel in listed}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    files["manifest.json"] = manifest
    return files_hash(files) == directory.name


def emitted(layer: Layer, fixed: dict, key: str | None) -> Path:
    """The op directory of ``layer`` (from the cache, or emitted into it now)."""
    specialise = {s.name: v for s, v in fixed.items()}
    try:
        return _emitted(cache_dir() / OPS, layer, specialise, key)
    except OSError as e:
        private = _private_root()
        log.warning("cache directory %s is unusable (%s): emitting the op into %s instead "
                    "(removed at exit)", cache_dir(), e.strerror or e, private)
        return _emitted(private, layer, specialise, None)


def _emitted(root: Path, layer: Layer, specialise: dict, key: str | None) -> Path:
    index = root / BY_LAYER / key if key else None
    if index is not None:
        try:
            name = index.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if re.fullmatch(r"[0-9a-f]{64}", name) and _intact(root / name):
            return root / name
    from vggen.compiler import emit

    files = emit.outputs([layer], specialise)
    directory = publish(root, files)
    if index is not None:
        _write(index, directory.name + "\n")
    return directory


def _write(path: Path, text: str) -> None:
    try:
        write_atomic(path, text)
    except VggenError as e:                 # write_atomic reports an OSError as one
        raise OSError(errno.EIO, str(e)) from None


def publish(root: Path, files: Mapping[str, str]) -> Path:
    """``files`` as the op directory ``root/<files_hash>``: written into a
    temporary directory beside it, then renamed into place.  A directory of
    that name that is already whole is kept (a concurrent compile's); one
    that is not is set aside and replaced."""
    name = files_hash(files)
    final = root / name
    if _intact(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(root)
    tmp = root / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for rel, text in files.items():
            _write(tmp / rel, text)
        for _ in range(3):
            try:
                os.rename(tmp, final)
                fsync_directory(root)
                return final
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                    raise
            if _intact(final):                 # a concurrent compile published it first
                return final
            old = root / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.old"
            try:
                os.rename(final, old)          # damaged: out of the way, then removed
            except FileNotFoundError:
                continue
            log.warning("op directory %s was damaged: emitted again", final)
            shutil.rmtree(old, ignore_errors=True)
        raise OSError(errno.EBUSY, f"cannot publish {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_dead_temporaries(root: Path) -> list[Path]:
    """Remove the temporary op directories of compiles whose process is gone."""
    return remove_dead_writers(root, _TEMPORARY)


_PRIVATE: list[Path] = []


def _private_root() -> Path:
    if not _PRIVATE:
        try:
            path = Path(tempfile.mkdtemp(prefix="vggen-ops-"))
        except OSError as e:
            raise VggenError(f"cannot create a temporary directory to emit the op in: {e.strerror or e}") \
                from None
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _PRIVATE.append(path)
    return _PRIVATE[0]


__all__ = ["compile", "Op", "TARGETS", "infer_sizes", "UntoldSizes", "layer_key", "files_hash", "publish",
           "emitted", "remove_dead_temporaries"]
