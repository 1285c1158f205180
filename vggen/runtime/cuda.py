"""Run the generated CUDA kernels through CuPy.

Each ``generated/cuda/*.cu`` is self-contained (no ``#include``) and is
loaded as one ``cupy.RawModule`` (options ``-std=c++17``), compiled by NVRTC
on first use and cached by CuPy.  The kernels are ``extern "C"`` and looked
up by the names in ``generated/manifest.json``.  Launch geometry comes from
the manifest's ``launch`` entry: ``block`` (``VG_THREADS`` threads along x)
and ``grid`` (Python expressions in the sizes: one thread per output element
for a "thread" kernel, one block per output element for a "block" kernel);
the kernels loop grid-stride over their outputs, so the grid is capped at
MAX_BLOCKS without loss.

Arguments are checked before every launch exactly as in :mod:`vggen.runtime.c`
(CuPy array, float32 / int32, shape, C-contiguity), and a mismatch is a
VggenError naming the kernel and the argument.  Without CuPy the backend
raises a VggenError telling the user to install the ``cuda`` extra.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from vggen.errors import VggenError
from vggen.frontend.lang import Layer
from vggen.manifest import KernelSpec, check_manifest_shape, eval_size, kernels_for, read_manifest
from vggen.paths import generated_dir
from vggen.runtime.base import Backend, Program, check_argument

OPTIONS = ("-std=c++17",)
MAX_BLOCKS = 65535 * 16        # grid-stride kernels: more blocks than this buys nothing


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


class CudaProgram(Program):
    def __init__(self, backend: "CudaBackend", layer: Layer, sizes):
        super().__init__(backend, layer, sizes)
        specs = kernels_for(backend.specs, "cuda", layer)
        if not specs:
            raise VggenError(f"no cuda kernels for layer {layer.name} in {backend.manifest}: "
                             f"regenerate the kernels (`vggen build`)")
        np_types = {"int": np.int32, "int32": np.int32, "int64": np.int64, "long": np.int64}
        self.specs = specs
        self.calls = []
        for spec in specs:
            fn = backend.function(spec)
            tensors, size_values = [], []
            for a in spec.args:
                if a.kind == "tensor":
                    want = np.dtype(np.int32 if a.dtype.startswith("int") else np.float32)
                    if a.name not in self.shapes:
                        raise VggenError(f"kernel {spec.name}: argument {a.name} is not a tensor "
                                         f"of layer {layer.name}")
                    check_manifest_shape(spec, a, self.shapes[a.name], self.sizes)
                    tensors.append((a.name, self.shapes[a.name], want))
                else:
                    if a.name not in self.sizes:
                        raise VggenError(f"kernel {spec.name}: no value for size {a.name}")
                    size_values.append(np_types.get(a.dtype, np.int32)(self.sizes[a.name]))
            grid, block = launch_shape(spec, self.sizes)
            self.calls.append((fn, spec.name, tuple(tensors), tuple(size_values), grid, block,
                               frozenset(spec.writes)))
        self.readers: dict = {}
        for _, name, tensors, _, _, _, writes in self.calls:
            for n, _, _ in tensors:
                if n not in writes:
                    self.readers.setdefault(n, set()).add(name)

    def launches(self, env: dict) -> list["Launch"]:
        """Each kernel call of the program on ``env``'s arrays (checked), to
        launch on its own: the tuner replays the tiled ones."""
        out = []
        for spec, (fn, name, tensors, sizes, grid, block, _) in zip(self.specs, self.calls):
            args = []
            for tname, shape, dtype in tensors:
                check_argument(name, tname, env[tname], shape, dtype, self.backend.array_type)
                args.append(env[tname])
            out.append(Launch(self.backend, spec, fn, grid, block, (*args, *sizes)))
        return out

    def run(self, env: dict, skip: frozenset) -> None:
        array_type = self.backend.array_type
        for fn, name, tensors, sizes, grid, block, writes in self.calls:
            if skip and writes <= skip and not any(self.readers.get(w) for w in writes):
                continue
            args = []
            for tname, shape, dtype in tensors:
                a = env[tname]
                check_argument(name, tname, a, shape, dtype, array_type)
                args.append(a)
            prof = self.backend.profiler
            if prof is not None:
                prof.begin(name)
            fn(grid, block, (*args, *sizes))
            if prof is not None:
                prof.end(name)


class Launch:
    """One kernel call with its arguments bound (see CudaProgram.launches)."""

    def __init__(self, backend: "CudaBackend", spec: KernelSpec, fn, grid, block, args):
        self.backend, self.spec, self.fn, self.grid, self.block, self.args = backend, spec, fn, grid, block, args

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self) -> None:
        self.fn(self.grid, self.block, self.args)

    def with_tune(self, value: int) -> None:
        """Launch with the kernel's ``vg_tune_<name>`` set to ``value`` (a
        tiled kernel's forced choice; 0: its own)."""
        self.backend.set_tune(self.spec, value)
        self()


class CudaBackend(Backend):
    """The generated CUDA kernels on CuPy arrays."""

    name = "cuda"

    def __init__(self, generated: str | Path | None = None):
        super().__init__()
        cupy = _import_cupy()
        self.cupy = self.xp = cupy
        self.array_type = cupy.ndarray
        self.generated = Path(generated) if generated else generated_dir()
        self.manifest = self.generated / "manifest.json"
        self.specs = read_manifest(self.manifest)
        if not any(s.target == "cuda" for s in self.specs):
            raise VggenError(f"{self.manifest} lists no CUDA kernels: regenerate them (`vggen build`)")
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

    def _prepare(self, layer, sizes):
        return CudaProgram(self, layer, sizes)

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


__all__ = ["CudaBackend", "CudaProgram", "Launch", "OPTIONS"]
