"""Run the generated CUDA kernels through CuPy.

Each ``generated/cuda/*.cu`` is self-contained (no ``#include``) and is
loaded as one ``cupy.RawModule`` (options ``-std=c++17``), compiled by NVRTC
on first use and cached by CuPy.  The sources are first held to the
manifest's hashes (:class:`vggen.runtime.base.KernelBackend`): edited ones
are refused unless ``allow_modified_kernels``.  The kernels are
``extern "C"`` and looked up by the names in ``generated/manifest.json``.
Launch geometry comes from the manifest's ``launch`` entry: ``block``
(``VG_THREADS`` threads along x) and ``grid`` (Python expressions in the
sizes: one thread per output element for a "thread" kernel, one block per
output element for a "block" kernel); the kernels loop grid-stride over
their outputs, so the grid is capped at MAX_BLOCKS without loss.

Arguments are bound and checked by :class:`vggen.runtime.base.KernelProgram`
as for every kernel target (here: CuPy arrays).  Without CuPy the backend
raises a VggenError telling the user to install the ``cuda`` extra.

:class:`StepGraphs` captures a sequence of launches on one stream as a CUDA
graph and replays it (``vggen.model.step``'s ``graph=True``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vggen.errors import VggenError
from vggen.manifest import ArgSpec, KernelSpec, eval_size
from vggen.runtime.base import BoundCall, KernelBackend, KernelCall

OPTIONS = ("-std=c++17",)
MAX_BLOCKS = 65535 * 16        # grid-stride kernels: more blocks than this buys nothing
_SIZE_TYPES = {"int": np.int32, "int32": np.int32, "int64": np.int64, "long": np.int64}


def _import_cupy():
    try:
        import cupy
    except ImportError as e:
        raise VggenError("the cuda target needs CuPy: install the `cuda` extra "
                         "(pip install 'vggen[cuda]'), or use --target c") from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:      # CUDARuntimeError: no driver, no device
        raise VggenError(f"the cuda target found no usable GPU: {e}") from e
    if count < 1:
        raise VggenError("the cuda target found no GPU")
    return cupy


def launch_shape(spec: KernelSpec, sizes: dict) -> tuple[tuple, tuple]:
    """(grid, block) of a kernel from the manifest's ``launch`` entry.

    ``launch.grid`` holds Python expressions in the sizes; the kernels stride
    over the grid, so the grid is capped without loss (MAX_BLOCKS).
    """
    launch = spec.entry.get("launch")
    if not isinstance(launch, dict) or "grid" not in launch or "block" not in launch:
        raise VggenError(f"manifest: kernel {spec.name} has no CUDA launch shape: "
                         f"regenerate the kernels (`vggen build`)")
    block = tuple(int(b) for b in launch["block"])
    grid = [eval_size(g, sizes) for g in launch["grid"]]
    grid[0] = min(grid[0], MAX_BLOCKS)
    return tuple(max(1, g) for g in grid), block


class Launch(BoundCall):
    """One kernel call with its arguments bound (``KernelProgram.launches``)."""

    def with_tune(self, value: int) -> None:
        """Launch with the kernel's ``vg_tune_<name>`` set to ``value`` (a
        tiled kernel's forced choice; 0: its own)."""
        self.backend.set_tune(self.spec, value)
        self()


class CudaBackend(KernelBackend):
    """The generated CUDA kernels on CuPy arrays."""

    name = "cuda"
    manifest_target = "cuda"
    bound_call = Launch
    algorithm_model = False         # "auto": what `vggen tune --target cuda` measured, else direct

    def __init__(self, generated: str | Path | None = None, *, allow_modified_kernels: bool = False):
        cupy = _import_cupy()
        super().__init__(generated, allow_modified_kernels=allow_modified_kernels)
        self.cupy = self.xp = cupy
        self.array_type = cupy.ndarray
        self.sources = sorted((self.generated / "cuda").glob("*.cu"))
        if not self.sources:
            raise VggenError(f"no CUDA sources in {self.generated / 'cuda'}: `vggen build`")
        self._texts = {p: p.read_text() for p in self.sources}
        self._modules: dict = {}
        self._functions: dict = {}
        self._tunes: dict = {}          # kernel -> the vg_tune_<kernel> value last set

    def _module_for(self, spec: KernelSpec):
        path = None
        file = spec.entry.get("file") or spec.entry.get("source")
        if file:
            cand = [p for p in self.sources if p.name == Path(file).name]
            path = cand[0] if cand else None
        if path is None:
            pattern = re.compile(rf"\b{re.escape(spec.name)}\s*\(")
            found = [p for p, text in self._texts.items() if pattern.search(text)]
            if not found:
                raise VggenError(f"kernel {spec.name} is in none of {self.generated / 'cuda'}/*.cu")
            path = found[0]
        if path not in self._modules:
            self._modules[path] = self.cupy.RawModule(code=self._texts[path], options=OPTIONS)
        return self._modules[path]

    def function(self, spec: KernelSpec):
        fn = self._functions.get(spec.name)
        if fn is None:
            try:
                fn = self._module_for(spec).get_function(spec.name)
            except self.cupy.cuda.compiler.CompileException as e:
                raise VggenError(f"CUDA compilation of kernel {spec.name} failed: {e}") from e
            self._functions[spec.name] = fn
        return fn

    def set_tune(self, spec: KernelSpec, value: int) -> None:
        """Set a tiled kernel's ``vg_tune_<name>`` (its manifest ``launch.tune.symbol``)."""
        tune = (spec.entry.get("launch") or {}).get("tune")
        if not tune:
            raise VggenError(f"kernel {spec.name} has no tuning hook (not a tiled contraction)")
        if self._tunes.get(spec.name) == value:
            return
        ptr = self._module_for(spec).get_global(tune["symbol"])
        ptr.copy_from_host(np.array([value], np.int32).ctypes.data, 4)
        self._tunes[spec.name] = value

    def device_name(self) -> str:
        props = self.cupy.cuda.runtime.getDeviceProperties(self.cupy.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def size_argument(self, arg: ArgSpec, value: int):
        return _SIZE_TYPES.get(arg.dtype, np.int32)(value)

    def geometry(self, spec: KernelSpec, sizes) -> tuple[tuple, tuple]:
        return launch_shape(spec, sizes)

    def launch(self, call: KernelCall, arrays: list) -> None:
        grid, block = call.geometry
        call.fn(grid, block, (*arrays, *call.sizes))

    # ---- arrays
    def asarray(self, host, dtype=None):
        return self.cupy.array(host, dtype=dtype, order="C")

    # Transfers run on the current stream, named explicitly (CuPy versions differ
    # in what they default to): a step on its own stream (vggen.model.step) orders its
    # copies after the previous step's kernels there.
    def copy_in(self, dst, host) -> None:
        if isinstance(host, self.cupy.ndarray):
            dst[...] = host
            return
        host = np.ascontiguousarray(host, dtype=dst.dtype)
        if host.shape != dst.shape:
            raise VggenError(f"cannot copy an array of shape {host.shape} into {dst.shape}")
        dst.set(host, stream=self.cupy.cuda.get_current_stream())

    def to_host(self, a) -> np.ndarray:
        return self.to_host_all([a])[0]

    def to_host_all(self, arrays) -> list[np.ndarray]:
        stream = self.cupy.cuda.get_current_stream()
        out = [self.cupy.ascontiguousarray(a).get(stream=stream) for a in arrays]
        stream.synchronize()
        return out

    def synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()


class StepGraphs:
    """Kernel launches captured as CUDA graphs on a stream of their own, and replayed there.

    Uses only the backend's ``cupy`` (a stream that can capture), so any
    backend carrying one can record.  Launches are captured while the stream
    is current: issue them inside ``with graphs.stream:``.
    """

    def __init__(self, backend):
        cupy = getattr(backend, "cupy", None)
        if cupy is None:
            raise VggenError("CUDA graphs need the cuda target (--target cuda)")
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def capture(self, launches: Callable[[], object]):
        """A graph of the kernels ``launches()`` issues; none of them runs now."""
        self.stream.begin_capture()
        try:
            launches()
        finally:
            graph = self.stream.end_capture()
        return graph

    def replay(self, graph) -> None:
        graph.launch(self.stream)


__all__ = ["CudaBackend", "Launch", "StepGraphs", "launch_shape", "OPTIONS", "MAX_BLOCKS"]
