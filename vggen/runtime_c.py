"""Run the generated C kernels: compile once, cache, load with ctypes, check, call.

``generated/c/*.c`` (with any ``*.h`` beside them) are compiled together into
one shared library with the system compiler::

    cc -O3 -march=native -fno-math-errno -fopenmp -shared -fPIC -o LIB.so generated/c/*.c -lm

(``$CC`` overrides ``cc``.)  The library is cached in ``$XDG_CACHE_HOME/vggen``
(default ``~/.cache/vggen``) under the SHA-256 of the sources, the flags and
the compiler's version, written to a temporary file and renamed into place,
so concurrent builds and interrupted ones never leave a half-written library
under the final name.  A cached library that fails to load, or lacks a
kernel, is deleted and rebuilt.

``generated/manifest.json`` lists the kernels: per kernel its name, target,
layer, direction, class and ``signature`` — the ordered arguments (tensor
pointers it reads, then those it writes, then ``int`` sizes; see
:mod:`vggen.ir`).  A layer's program is its kernels in manifest order.
Before every call each array argument is checked against the tensor's
concrete shape, dtype (float32 / int32) and C-contiguity, and a mismatch is
a VggenError naming the kernel and the argument; the arrays themselves are
passed by pointer, never copied or converted.
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .backends import COMPUTED, Backend, Program, check_argument
from .errors import VggenError
from .lang import Layer, Role

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)


# --------------------------------------------------------------------------- places


def generated_dir() -> Path:
    """``$VGGEN_GENERATED``, else ``generated/`` beside the package."""
    env = os.environ.get("VGGEN_GENERATED")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "generated"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vggen"


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ArgSpec:
    name: str
    kind: str        # "tensor" or "size"
    dtype: str       # "float32", "int32", or "int" for sizes
    access: str      # "read", "write", "size"


@dataclass(frozen=True)
class KernelSpec:
    name: str
    target: str
    layer: str       # the forward layer's name
    direction: str   # "forward" or "backward"
    cls: str
    args: tuple
    entry: dict      # the manifest entry as written

    @property
    def tensors(self) -> list[ArgSpec]:
        return [a for a in self.args if a.kind == "tensor"]

    @property
    def writes(self) -> list[str]:
        return [a.name for a in self.args if a.access == "write"]

    @property
    def reads(self) -> list[str]:
        return [a.name for a in self.args if a.access == "read"]


def _arg(raw, kernel: str) -> ArgSpec:
    if isinstance(raw, dict):
        kind = raw.get("kind", "tensor")
        dtype = raw.get("dtype", "float32" if kind == "tensor" else "int")
        access = raw.get("access", "size" if kind == "size" else "read")
        return ArgSpec(str(raw["name"]), kind, str(dtype), str(access))
    raise VggenError(f"manifest: kernel {kernel}: cannot read argument {raw!r}")


def _split_layer(entry: dict) -> tuple[str, str]:
    layer = str(entry.get("layer", ""))
    direction = entry.get("direction")
    if direction is None:
        direction = "backward" if layer.endswith(" backward") else "forward"
    if layer.endswith(" backward"):
        layer = layer[: -len(" backward")]
    return layer, str(direction)


def read_manifest(path: Path) -> list[KernelSpec]:
    """Every kernel of ``manifest.json``, in file order."""
    if not path.is_file():
        raise VggenError(f"{path} does not exist: generate the kernels first (`vggen build`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VggenError(f"cannot read {path}: {e}") from e
    entries = data.get("kernels") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise VggenError(f"{path}: expected a list of kernels")
    out = []
    for e in entries:
        try:
            name = str(e["name"])
            layer, direction = _split_layer(e)
            args = tuple(_arg(a, name) for a in e["signature"])
            out.append(KernelSpec(name, str(e.get("target", "")), layer, direction,
                                  str(e.get("class", "")), args, e))
        except (KeyError, TypeError) as err:
            raise VggenError(f"{path}: malformed kernel entry {e!r}: {err}") from err
    return out


def _strip_specialisation(name: str) -> str:
    """'Convolution2D(K=1)' → 'Convolution2D'."""
    return name.split("(", 1)[0]


def kernels_for(specs: list[KernelSpec], target: str, layer: Layer) -> list[KernelSpec]:
    """The kernels of ``layer`` (forward or backward program) for ``target``, in order.

    A layer built with a concrete window (``convolution2d(1)``, named
    ``Convolution2D(K=1)``) also matches kernels generated from the generic
    layer with that window specialised (``Convolution2D``).
    """
    name, direction = layer.name, "forward"
    if name.endswith(" backward"):
        name, direction = name[: -len(" backward")], "backward"
    # only kernels writing what this layer computes: a layer whose intermediates
    # are given (``Layer.with_given``) runs the rest of the generated kernels
    computed = {t.name for t in layer.tensors if t.role in COMPUTED or t.role is Role.STATE}
    mine = [k for k in specs if k.target == target and k.direction == direction
            and set(k.writes) <= computed]
    exact = [k for k in mine if k.layer == name]
    if exact:
        return exact
    return [k for k in mine if _strip_specialisation(k.layer) == _strip_specialisation(name)]


def eval_size(expr: str, sizes: dict) -> int:
    """A manifest size expression (``"OC"``, ``"3"``, ``"(B*H + 255) // 256"``) → int.

    Only integers, size names, ``+ - * // %`` and parentheses are accepted.
    """
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in sizes:
                raise VggenError(f"manifest expression {expr!r}: no value for size {node.id}")
            return int(sizes[node.id])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise VggenError(f"manifest expression {expr!r}: cannot evaluate {ast.dump(node)}")
    try:
        tree = ast.parse(str(expr).strip(), mode="eval")
    except SyntaxError as e:
        raise VggenError(f"manifest expression {expr!r} is not an expression") from e
    return ev(tree)


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


def check_manifest_shape(spec: KernelSpec, arg: ArgSpec, shape: tuple, sizes: dict) -> None:
    """The manifest's shape of ``arg`` (strings in the sizes) must be the layer's ``shape``."""
    raw = next((a.get("shape") for a in spec.entry.get("signature", [])
                if isinstance(a, dict) and a.get("name") == arg.name), None)
    if raw is None:
        return
    theirs = tuple(eval_size(e, sizes) for e in raw)
    if theirs != tuple(shape):
        raise VggenError(f"kernel {spec.name}: argument {arg.name} has shape {theirs} "
                         f"({', '.join(raw)}) in the manifest but {tuple(shape)} in layer "
                         f"{spec.layer}: was it generated for another window size?")


# --------------------------------------------------------------------------- compiling


@lru_cache(maxsize=8)
def _compiler_identity(cc_path: str) -> str:
    try:
        out = subprocess.run([cc_path, "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return cc_path


def find_compiler(cc: str | None = None) -> str:
    cc = cc or os.environ.get("CC") or "cc"
    path = shutil.which(cc)
    if path is None:
        raise VggenError(f"no C compiler: `{cc}` was not found on PATH; install one "
                         f"(e.g. `apt-get install gcc`) or set CC, or use --target numpy")
    return path


def library_key(sources: list[Path], cc_path: str, flags: tuple) -> str:
    h = hashlib.sha256()
    h.update(_compiler_identity(cc_path).encode())
    h.update(b"\0" + " ".join(flags).encode() + b"\0")
    for src in sorted(sources, key=lambda p: p.name):
        h.update(src.name.encode() + b"\0")
        h.update(hashlib.sha256(src.read_bytes()).digest())
    return h.hexdigest()


def compile_library(sources: list[Path], out: Path, cc_path: str, flags: tuple) -> None:
    """Compile ``sources`` into ``out`` atomically; VggenError with the compiler's message."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.stem}.{os.getpid()}.{secrets.token_hex(4)}.so"
    c_files = [str(s) for s in sources if s.suffix == ".c"]
    includes = sorted({f"-I{s.parent}" for s in sources})
    cmd = [cc_path, *flags, *includes, "-o", str(tmp), *c_files, *LIBS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise VggenError(f"cannot run the C compiler {cc_path}: {e}") from e
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        message = (proc.stderr or proc.stdout).strip()
        raise VggenError(f"C compilation failed ({' '.join(cmd)}):\n{message}")
    os.replace(tmp, out)


def _load(path: Path, names: list[str]) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
        for n in names:
            getattr(lib, n)
        return lib
    except (OSError, AttributeError):
        return None


def build_library(sources: list[Path], names: list[str], cc: str | None = None,
                  flags: tuple = FLAGS, cache: Path | None = None) -> tuple[ctypes.CDLL, Path]:
    """The loaded library of ``sources`` (from the cache, or compiled now)."""
    if not any(s.suffix == ".c" for s in sources):
        raise VggenError("no C sources to compile: generate the kernels first (`vggen build`)")
    cc_path = find_compiler(cc)
    cache = cache or cache_dir()
    path = cache / f"{library_key(sources, cc_path, tuple(flags))}.so"
    if path.exists():
        lib = _load(path, names)
        if lib is not None:
            return lib, path
        path.unlink(missing_ok=True)       # corrupt or stale: rebuild
    compile_library(sources, path, cc_path, tuple(flags))
    lib = _load(path, names)
    if lib is None:
        try:
            ctypes.CDLL(str(path))
            reason = "it lacks a kernel: " + ", ".join(n for n in names if _load(path, [n]) is None)
        except OSError as e:
            reason = str(e)
        raise VggenError(f"the compiled kernel library {path} cannot be loaded: {reason}")
    return lib, path


# --------------------------------------------------------------------------- programs


_CTYPES = {"int": ctypes.c_int, "int32": ctypes.c_int32, "int64": ctypes.c_int64,
           "long": ctypes.c_long}


class _Call:
    """One bound kernel call: the function, its checked tensors, its sizes."""

    __slots__ = ("fn", "name", "tensors", "sizes", "writes")

    def __init__(self, fn, name, tensors, sizes, writes):
        self.fn, self.name, self.tensors, self.sizes, self.writes = fn, name, tensors, sizes, writes


class CProgram(Program):
    def __init__(self, backend: "CBackend", layer: Layer, sizes):
        super().__init__(backend, layer, sizes)
        specs = kernels_for(backend.specs, backend.manifest_target, layer)
        if not specs:
            raise VggenError(f"no {backend.manifest_target} kernels for layer {layer.name} in "
                             f"{backend.manifest}: regenerate the kernels (`vggen build`)")
        self.calls = []
        for spec in specs:
            fn = backend.function(spec)
            tensors = []
            for a in spec.tensors:
                if a.name not in self.shapes:
                    raise VggenError(f"kernel {spec.name}: argument {a.name} is not a tensor of "
                                     f"layer {layer.name}")
                want = np.dtype(np.int32 if a.dtype.startswith("int") else np.float32)
                if want != self.dtypes[a.name]:
                    raise VggenError(f"kernel {spec.name}: argument {a.name} is {a.dtype} in the "
                                     f"manifest but {self.dtypes[a.name]} in layer {layer.name}")
                check_manifest_shape(spec, a, self.shapes[a.name], self.sizes)
                tensors.append((a.name, self.shapes[a.name], want))
            size_values = []
            for a in spec.args:
                if a.kind != "size":
                    continue
                if a.name not in self.sizes:
                    raise VggenError(f"kernel {spec.name}: no value for size {a.name}")
                size_values.append(int(self.sizes[a.name]))
            self.calls.append(_Call(fn, spec.name, tuple(tensors), tuple(size_values),
                                    frozenset(spec.writes)))
        self.readers: dict = {}
        for call in self.calls:
            for n, _, _ in call.tensors:
                if n not in call.writes:
                    self.readers.setdefault(n, set()).add(call.name)

    def run(self, env: dict, skip: frozenset) -> None:
        for call in self.calls:
            if skip and call.writes <= skip and not any(self.readers.get(w) for w in call.writes):
                continue
            ptrs = []
            for name, shape, dtype in call.tensors:
                a = env[name]
                check_argument(call.name, name, a, shape, dtype)
                ptrs.append(a.ctypes.data)
            prof = self.backend.profiler
            if prof is not None:
                prof.begin(call.name)
            call.fn(*ptrs, *call.sizes)
            if prof is not None:
                prof.end(call.name)


class CBackend(Backend):
    """The generated C kernels (OpenMP), called in place on NumPy arrays."""

    name = "c"
    manifest_target = "c"

    def __init__(self, generated: str | Path | None = None, cc: str | None = None,
                 flags: tuple = FLAGS, cache: str | Path | None = None):
        super().__init__()
        self.generated = Path(generated) if generated else generated_dir()
        self.manifest = self.generated / "manifest.json"
        self.specs = read_manifest(self.manifest)
        mine = [s for s in self.specs if s.target == self.manifest_target]
        if not mine:
            raise VggenError(f"{self.manifest} lists no C kernels: regenerate them (`vggen build`)")
        sources = sorted((self.generated / "c").glob("*.c")) + sorted((self.generated / "c").glob("*.h"))
        self.lib, self.library = build_library(sources, [s.name for s in mine], cc, tuple(flags),
                                               Path(cache) if cache else None)
        self._functions: dict = {}

    def function(self, spec: KernelSpec):
        fn = self._functions.get(spec.name)
        if fn is None:
            fn = getattr(self.lib, spec.name)
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p if a.kind == "tensor" else _CTYPES.get(a.dtype, ctypes.c_int)
                           for a in spec.args]
            self._functions[spec.name] = fn
        return fn

    def can_skip(self, layer: Layer) -> bool:
        return True

    def _prepare(self, layer, sizes):
        return CProgram(self, layer, sizes)


__all__ = ["CBackend", "CProgram", "build_library", "compile_library", "read_manifest",
           "kernels_for", "find_compiler", "cache_dir", "generated_dir", "FLAGS"]
