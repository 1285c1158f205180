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

A layer's program is its kernels in manifest order, bound and checked by
:class:`vggen.runtime.base.KernelProgram`; this module adds how a kernel is
found (by name in the library, its ``argtypes`` from the manifest's signature)
and called: the arrays are passed by pointer, never copied or converted.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from vggen.errors import VggenError
from vggen.manifest import KernelSpec
from vggen.paths import cache_dir
from vggen.runtime.base import KernelBackend, KernelCall

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)


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


# --------------------------------------------------------------------------- the backend


_CTYPES = {"int": ctypes.c_int, "int32": ctypes.c_int32, "int64": ctypes.c_int64,
           "long": ctypes.c_long}


class CBackend(KernelBackend):
    """The generated C kernels (OpenMP), called in place on NumPy arrays."""

    name = "c"
    manifest_target = "c"

    def __init__(self, generated: str | Path | None = None, cc: str | None = None,
                 flags: tuple = FLAGS, cache: str | Path | None = None):
        super().__init__(generated)
        c_dir = self.generated / "c"
        sources = sorted(c_dir.glob("*.c")) + sorted(c_dir.glob("*.h"))
        self.lib, self.library = build_library(sources, [s.name for s in self.kernels], cc,
                                               tuple(flags), Path(cache) if cache else None)
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

    def launch(self, call: KernelCall, arrays: list) -> None:
        call.fn(*(a.ctypes.data for a in arrays), *call.sizes)


__all__ = ["CBackend", "build_library", "compile_library", "library_key", "find_compiler", "FLAGS"]
