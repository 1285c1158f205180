"""Run the generated C kernels: check, compile once, cache, load with ctypes, call.

``generated/c/*.c`` (with any ``*.h`` beside them) are first held to the
hashes ``generated/manifest.json`` records for them
(:meth:`vggen.manifest.Manifest.verify_sources`): edited sources are refused,
or with ``allow_modified_kernels`` compiled with a warning.  They are
compiled together into one shared library with the system compiler::

    cc -O3 -march=native -fno-math-errno -fopenmp -shared -fPIC -o LIB.so generated/c/*.c -lm

(``$CC`` overrides ``cc``.)  The cache (:func:`vggen.paths.cache_dir`) keeps
a library as ``<key>.so``, ``key`` the SHA-256 of the sources, the flags and
the compiler's version, beside its record ``<key>.json`` (the key, the size
and SHA-256 of the ``.so``, the compiler and the flags).  What holds:

* the compiler writes ``.<key>.<pid>.<hex>.so``, which is fsynced and renamed
  to ``<key>.so``, and the directory fsynced; only then is the record
  written the same way (``.<key>.<pid>.<hex>.json``).  A crash leaves at
  worst a library without its record, never a record of a partial library;
* a cached library is loaded only when its record parses, names its key, and
  the file's size and SHA-256 are the record's.  Anything else (a truncated
  library, no record, a garbled one) is removed and rebuilt with a warning:
  an unverified file is never ``dlopen``-ed (a truncated one kills the
  process with SIGBUS).  A verified library that does not load, or lacks a
  kernel, is rebuilt too;
* temporary files whose process is gone (a killed compile) are removed by
  the next build in the directory;
* a cache directory that cannot be created or written is replaced, with a
  warning naming it and why, by a private temporary directory removed at
  exit.

Only a compiler failure, or a freshly built library that does not load, is
an error.

``precision="bf16"`` compiles the same sources with ``-DVG_BF16`` added (a
library of its own, the flags being in the key): the matrix-product
contractions then round their packed operands to bf16 and multiply them on
AMX tiles where the CPU and Linux allow them, else with AVX-512 BF16 dot
products (``-DVG_BF16_NO_AMX``: always), accumulating in fp32
(``templates/c/file.c.j2``);
every other kernel, and every array the caller sees, stays fp32.  It needs a
CPU with ``avx512_bf16`` and a compiler that defines ``__AVX512BF16__`` under
``-march=native``; without either the backend refuses, naming what is missing.

A layer's program is its kernels in manifest order, bound and checked by
:class:`vggen.runtime.base.KernelProgram`; this module adds how a kernel is
found (by name in the library, its ``argtypes`` from the manifest's signature)
and called: the arrays are passed by pointer, never copied or converted.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from vggen.atomic import fsync_directory, remove_dead_writers
from vggen.errors import VggenError
from vggen.manifest import KernelSpec
from vggen.paths import cache_dir
from vggen.runtime.base import KernelBackend, KernelCall

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
PRECISIONS = ("fp32", "bf16")
BF16_FLAGS = ("-DVG_BF16",)
LIBS = ("-lm",)
# a temporary file of this module's: the pid that writes it is in the name, to
# tell one a killed process left (vggen.tools.cache knows these names too)
TEMPORARY = re.compile(r"\.[0-9a-f]{64}\.(\d+)\.[0-9a-f]+\.(so|json)")

log = logging.getLogger(__name__)


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _temporary(directory: Path, key: str, suffix: str) -> Path:
    """A new, empty temporary file of ``key`` in ``directory`` (OSError: cannot write there)."""
    tmp = directory / f".{key}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Make the whole ``tmp`` durable as ``final``: fsync it, rename it, fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_directory(final.parent)


def record_path(library: Path) -> Path:
    """The record of ``<key>.so``: ``<key>.json``."""
    return library.with_suffix(".json")


def compile_library(sources: list[Path], out: Path, cc_path: str, flags: tuple) -> dict:
    """Compile ``sources`` into ``out`` and write its record beside it (see the
    module docstring); returns the record.  VggenError with the compiler's
    message; OSError when ``out``'s directory cannot be created or written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    key = out.stem
    # created here, before a compile of seconds, so that an unwritable directory shows at once
    tmp = _temporary(out.parent, key, ".so")
    c_files = [str(s) for s in sources if s.suffix == ".c"]
    includes = sorted({f"-I{s.parent}" for s in sources})
    cmd = [cc_path, *flags, *includes, "-o", str(tmp), *c_files, *LIBS]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise VggenError(f"cannot run the C compiler {cc_path}: {e}") from e
        if proc.returncode != 0:
            message = (proc.stderr or proc.stdout).strip()
            raise VggenError(f"C compilation failed ({' '.join(cmd)}):\n{message}")
        record = {"key": key, "sha256": _sha256(tmp), "size": tmp.stat().st_size,
                  "compiler": _compiler_identity(cc_path), "flags": list(flags)}
        _publish(tmp, out)
    finally:
        _discard(tmp)
    tmp = _temporary(out.parent, key, ".json")
    try:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _publish(tmp, record_path(out))
    finally:
        _discard(tmp)
    return record


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):      # renamed into place already, or never written
        tmp.unlink()


def library_damage(library: Path, key: str) -> str | None:
    """Why the cached ``library`` cannot be trusted, or None when its record vouches for it."""
    record = record_path(library)
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no record {record.name}: an older vggen's, or a build cut short"
    except (OSError, UnicodeDecodeError, ValueError):
        return f"its record {record.name} is unreadable"
    if (not isinstance(data, dict) or data.get("key") != key
            or not isinstance(data.get("size"), int) or not isinstance(data.get("sha256"), str)):
        return f"its record {record.name} does not describe it"
    try:
        size = library.stat().st_size
        if size != data["size"]:
            return f"size {size}, expected {data['size']}"
        if _sha256(library) != data["sha256"]:
            return "its SHA-256 differs from its record"
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    return None


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove the temporary files in ``directory`` whose writing process is gone."""
    return remove_dead_writers(directory, TEMPORARY)


_PRIVATE: list[Path] = []          # this process's fallback cache, made on first need


def _private_cache() -> Path:
    if not _PRIVATE:
        try:
            path = Path(tempfile.mkdtemp(prefix="vggen-"))
        except OSError as e:
            raise VggenError(f"cannot create a temporary directory to compile the kernels in: "
                             f"{e.strerror or e}") from None
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _PRIVATE.append(path)
    return _PRIVATE[0]


def _load(path: Path, names: list[str]) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
        for n in names:
            getattr(lib, n)
        return lib
    except (OSError, AttributeError):
        return None


def _cached_or_built(directory: Path, key: str, sources: list[Path], names: list[str],
                     cc_path: str, flags: tuple) -> tuple[ctypes.CDLL, Path]:
    """The library ``key`` from ``directory``, verified, or compiled into it now.
    OSError: ``directory`` cannot be created or written."""
    path = directory / f"{key}.so"
    remove_stale_temporaries(directory)
    if path.is_file():
        reason = library_damage(path, key)
        if reason is None:
            lib = _load(path, names)
            if lib is not None:
                return lib, path
            reason = "it does not load, or lacks a kernel"
        log.warning("compiled library %s is damaged (%s): rebuilding", path, reason)
        path.unlink(missing_ok=True)
        record_path(path).unlink(missing_ok=True)
    compile_library(sources, path, cc_path, flags)
    lib = _load(path, names)
    if lib is None:
        try:
            ctypes.CDLL(str(path))
            reason = "it lacks a kernel: " + ", ".join(n for n in names if _load(path, [n]) is None)
        except OSError as e:
            reason = str(e)
        raise VggenError(f"the compiled kernel library {path} cannot be loaded: {reason}")
    return lib, path


def build_library(sources: list[Path], names: list[str], cc: str | None = None,
                  flags: tuple = FLAGS, cache: Path | None = None) -> tuple[ctypes.CDLL, Path]:
    """The loaded library of ``sources`` (from the cache, or compiled now); see
    the module docstring for what the cache guarantees."""
    if not any(s.suffix == ".c" for s in sources):
        raise VggenError("no C sources to compile: generate the kernels first (`vggen build`)")
    cc_path = find_compiler(cc)
    flags = tuple(flags)
    key = library_key(sources, cc_path, flags)
    cache = cache or cache_dir()
    try:
        return _cached_or_built(cache, key, sources, names, cc_path, flags)
    except OSError as e:
        private = _private_cache()
        reason = "not a directory" if cache.exists() and not cache.is_dir() else e.strerror or str(e)
        log.warning("cache directory %s is unusable (%s): compiling the kernels in %s instead "
                    "(removed at exit)", cache, reason, private)
    try:
        return _cached_or_built(private, key, sources, names, cc_path, flags)
    except OSError as e:
        raise VggenError(f"cannot write the compiled kernel library to {private}: "
                         f"{e.strerror or e}") from None


# --------------------------------------------------------------------------- bf16 support


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _compiler_macros(cc_path: str, flags: tuple) -> str:
    """The macros ``cc_path`` predefines under ``flags`` (``-dM -E``), or "" where it cannot say."""
    args = [f for f in flags if f.startswith(("-m", "-f")) and f != "-fPIC"]
    try:
        out = subprocess.run([cc_path, *args, "-dM", "-E", "-x", "c", "-"], input="",
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout


def bf16_missing(cc_path: str, flags: tuple = FLAGS, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """What keeps ``--precision bf16`` from running here, or None when nothing does."""
    if "avx512_bf16" not in _cpu_flags(cpuinfo):
        return "this CPU lacks avx512_bf16 (no such flag in /proc/cpuinfo)"
    if "__AVX512BF16__" not in _compiler_macros(cc_path, flags):
        return f"the C compiler {cc_path} does not define __AVX512BF16__ under {' '.join(flags)}"
    return None


def precision_flags(precision: str, cc_path: str, flags: tuple = FLAGS) -> tuple:
    """``flags`` for ``precision``: bf16 adds -DVG_BF16, once checked that it can run here."""
    if precision not in PRECISIONS:
        raise VggenError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return tuple(flags)
    missing = bf16_missing(cc_path, tuple(flags))
    if missing:
        raise VggenError(f"--precision bf16 needs AVX-512 BF16: {missing}")
    return (*flags, *BF16_FLAGS)


# --------------------------------------------------------------------------- the backend


_CTYPES = {"int": ctypes.c_int, "int32": ctypes.c_int32, "int64": ctypes.c_int64,
           "long": ctypes.c_long}


class CBackend(KernelBackend):
    """The generated C kernels (OpenMP), called in place on NumPy arrays;
    ``precision`` "bf16": the contractions' products in bf16 (module docstring)."""

    name = "c"
    manifest_target = "c"

    def __init__(self, generated: str | Path | None = None, cc: str | None = None,
                 flags: tuple = FLAGS, cache: str | Path | None = None, *,
                 allow_modified_kernels: bool = False, precision: str = "fp32"):
        super().__init__(generated, allow_modified_kernels=allow_modified_kernels)
        self.precision = precision
        flags = precision_flags(precision, find_compiler(cc), tuple(flags))
        c_dir = self.generated / "c"
        sources = sorted(c_dir.glob("*.c")) + sorted(c_dir.glob("*.h"))
        self.lib, self.library = build_library(sources, [s.name for s in self.kernels], cc,
                                               flags, Path(cache) if cache else None)
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


__all__ = ["CBackend", "build_library", "compile_library", "library_damage", "library_key", "find_compiler",
           "record_path", "remove_stale_temporaries", "FLAGS", "PRECISIONS", "bf16_missing", "precision_flags"]
