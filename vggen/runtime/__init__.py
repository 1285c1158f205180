"""Runtime: the backend registry, one backend per target, chosen by name.

``get_backend("auto")`` picks cuda when CuPy and a GPU are present, else c.
Each backend is created once, on first use; the c and cuda backends are
imported only then, so that a compiler or CuPy is needed only by the target
that uses it.  A backend made to run modified kernels
(``allow_modified_kernels``) is never handed to a caller that did not ask
for that.  ``precision`` "bf16" (the contractions' products in bf16) is the
c target's only: a backend of its own, beside the fp32 one.
"""

from __future__ import annotations

from collections.abc import Callable

from vggen.errors import VggenError
from vggen.runtime.base import Backend
from vggen.runtime.numpy import NumpyBackend


def _c_backend(allow_modified_kernels: bool = False, precision: str = "fp32", generated=None) -> Backend:
    from vggen.runtime.c import CBackend
    return CBackend(generated, allow_modified_kernels=allow_modified_kernels, precision=precision)


def _cuda_backend(allow_modified_kernels: bool = False, generated=None) -> Backend:
    from vggen.runtime.cuda import CudaBackend
    return CudaBackend(generated, allow_modified_kernels=allow_modified_kernels)


_FACTORIES: dict[str, Callable[..., Backend]] = {
    "c": _c_backend,
    "cuda": _cuda_backend,
    "numpy": NumpyBackend,
}
TARGETS = ("auto", *_FACTORIES)


def cuda_available() -> bool:
    """CuPy importable and at least one GPU visible."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:       # ImportError, CUDARuntimeError, missing driver...
        return False


def resolve_target(target: str) -> str:
    """``target`` itself, or for ``auto`` the target of this machine."""
    if target not in TARGETS:
        raise VggenError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    if target == "auto":
        return "cuda" if cuda_available() else "c"
    return target


PRECISIONS = ("fp32", "bf16")
# by target; a bf16 backend by "<target>:bf16"
_BACKENDS: dict[str, Backend] = {}


def get_backend(target: str = "auto", allow_modified_kernels: bool = False,
                precision: str = "fp32") -> Backend:
    """The backend for ``target`` (``auto``, ``c``, ``cuda`` or ``numpy``), created once.

    ``allow_modified_kernels``: run generated sources that differ from the
    manifest, with a warning, rather than refuse them.  A backend that checked
    its sources serves either kind of request; one created to run modified
    sources does not serve a strict request: that one gets a new backend,
    which checks the sources again (and replaces it).
    """
    target = resolve_target(target)
    if precision not in PRECISIONS:
        raise VggenError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and target != "c":
        raise VggenError(f"--precision {precision} is for the c target only, not {target}")
    key = target if precision == "fp32" else f"{target}:{precision}"
    backend = _BACKENDS.get(key)
    if backend is None or (getattr(backend, "allow_modified_kernels", False)
                           and not allow_modified_kernels):
        extra = {"precision": precision} if precision != "fp32" else {}
        backend = _FACTORIES[target](allow_modified_kernels=allow_modified_kernels, **extra)
        _BACKENDS[key] = backend
    return backend


def kernel_backend(target: str, generated) -> Backend:
    """A new backend (not the shared one of :func:`get_backend`) for the kernels
    in ``generated``: for a tool that rebuilds them and must run what it built."""
    if target not in ("c", "cuda"):
        raise VggenError(f"{target!r} runs no generated kernels: use c or cuda")
    return _FACTORIES[target](generated=generated)


__all__ = ["PRECISIONS", "TARGETS", "cuda_available", "get_backend", "kernel_backend", "resolve_target"]
