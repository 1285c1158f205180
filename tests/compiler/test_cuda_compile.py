"""The generated CUDA compiles: every ``generated/cuda/*.cu`` and the kernels of
layers outside VGG, with ``nvcc -arch=sm_90 -cubin`` (warnings are errors);
each kernel is in its cubin under its extern "C" name.  Skipped only where
nvcc is absent.

The tiled contractions (vggen/compiler/targets/cuda/schedule.py) fit their register budget
(``ptxas --resource-usage``: ≤ 128 registers, no stack, no spills).

Where a CUDA driver and GPU are present too, every VGG kernel, and each tiled
contraction's ``<name>_simple`` fallback, is launched through the driver API
(ctypes, as CuPy's RawModule would: by name, with the manifest's launch
shape) and compared with the NumPy reference.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    ATOL,
    REPO,
    RTOL,
    kernel_arguments,
    layer_data,
    leaky_relu,
    reference,
    row_logsumexp,
)
from vggen.compiler.emit import generate, generated_layers
from vggen.compiler.ir import layer_slug
from vggen.compiler.targets.cuda.constants import THREADS as CUDA_THREADS
from vggen.compiler.targets.cuda.target import launch
from vggen.frontend.layers import (
    convolution2d,
    max_pooling2d,
    network_layers,
    vgg_layers,
)
from vggen.manifest import eval_size

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def compile_cubin(src: Path) -> bytes:
    out = src.with_suffix(".cubin")
    res = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-Werror", "all-warnings", "-o", str(out), str(src)],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed on {src.name}:\n{res.stderr}"
    return out.read_bytes()


def _compile_all(sources: dict, where: Path) -> dict:
    paths = {}
    for name, text in sources.items():
        paths[name] = where / f"{name}.cu"
        paths[name].write_text(text)
    with ThreadPoolExecutor(max_workers=2) as pool:
        cubins = dict(zip(paths, pool.map(compile_cubin, paths.values())))
    return cubins


@needs_nvcc
def test_every_generated_cu_file_compiles(tmp_path):
    files = sorted((REPO / "generated" / "cuda").glob("*.cu"))
    assert len(files) == len(generated_layers())
    cubins = _compile_all({f.stem: f.read_text() for f in files}, tmp_path)
    _, kernels = generate(generated_layers(), "cuda")
    blob = b"".join(cubins.values())
    for k in kernels:
        assert k.name.encode() + b"\0" in blob, f"{k.name} is not in the cubins (extern \"C\" name)"
        if k.fallback:
            assert k.fallback.encode() + b"\0" in blob, k.fallback


@needs_nvcc
def test_layers_outside_vgg_compile(tmp_path):
    text, kernels = generate([convolution2d(2), leaky_relu(), max_pooling2d(3), row_logsumexp()], "cuda")
    (cubin,) = _compile_all({"extra": text}, tmp_path).values()
    for k in kernels:
        assert k.name.encode() + b"\0" in cubin
        if k.fallback:
            assert k.fallback.encode() + b"\0" in cubin


@needs_nvcc
def test_tiled_contractions_fit_their_registers(tmp_path):
    """Two blocks of 256 threads per SM (__launch_bounds__(VG_THREADS, 2)): at
    most 128 registers, and nothing spilled, in every tiled kernel and in each
    configuration's __noinline__ function."""
    seen = set()
    for stem in ("convolution2d", "linear"):
        _, kernels = generate([layer for layer in vgg_layers() if layer_slug(layer.name) == stem], "cuda")
        src = tmp_path / f"{stem}.cu"
        src.write_text((REPO / "generated" / "cuda" / f"{stem}.cu").read_text())
        res = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "--resource-usage", "-o", str(src.with_suffix(".cubin")),
                              str(src)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        props = re.findall(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                           r"(\d+) bytes spill loads(?:\nptxas info\s*: Used (\d+) registers)?", res.stdout + res.stderr)
        for k in kernels:
            if k.tiled is None:
                continue
            mine = [p for p in props if p[0] == k.name or f"{k.name}__tile" in p[0]]
            assert len(mine) == 1 + len(k.tiled.configs), (k.name, mine)
            for name, stack, stores, loads, regs in mine:
                assert (stack, stores, loads) == ("0", "0", "0"), (name, stack, stores, loads)
                assert not regs or int(regs) <= 128, (name, regs)
            seen.add(k.name)
    assert len(seen) == 6


# --------------------------------------------------------------------------- on a GPU


class Driver:
    """The few CUDA driver calls needed to load a cubin and launch by name."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.check(self.lib.cuInit(0), "cuInit")
        dev, self.ctx = ctypes.c_int(), ctypes.c_void_p()
        self.check(self.lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev), "cuDevicePrimaryCtxRetain")
        self.check(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUDA error {rc}")

    def function(self, cubin: bytes, name: str):
        mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(cubin)), "cuModuleLoadData")
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), f"cuModuleGetFunction {name}")
        return fn

    def to_device(self, arr: np.ndarray) -> ctypes.c_uint64:
        ptr = ctypes.c_uint64()
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(max(arr.nbytes, 4))), "cuMemAlloc")
        self.check(self.lib.cuMemcpyHtoD_v2(ptr, arr.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(arr.nbytes)),
                   "cuMemcpyHtoD")
        return ptr

    def to_host(self, ptr, arr: np.ndarray):
        self.check(self.lib.cuMemcpyDtoH_v2(arr.ctypes.data_as(ctypes.c_void_p), ptr, ctypes.c_size_t(arr.nbytes)),
                   "cuMemcpyDtoH")
        self.check(self.lib.cuMemFree_v2(ptr), "cuMemFree")

    def launch(self, fn, grid: int, args: list):
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        self.check(self.lib.cuLaunchKernel(fn, grid, 1, 1, CUDA_THREADS, 1, 1, 0, None, params, None), "cuLaunchKernel")
        self.check(self.lib.cuCtxSynchronize(), "cuCtxSynchronize")


def _driver():
    try:
        return Driver()
    except (OSError, RuntimeError, AttributeError):
        return None


def run_on_gpu(drv: Driver, fn, gk, env: dict, sizes: dict, simple: bool = False) -> dict:
    """One kernel with the manifest's launch shape (``simple``: a tiled kernel's
    ``<name>_simple`` fallback, with the fallback's)."""
    host, outs = kernel_arguments(gk, env, sizes)
    args = [drv.to_device(a) if isinstance(a, np.ndarray) else a for a in host]
    how = launch(gk.ir, None if simple else gk.tiled)
    assert how["block"] == [CUDA_THREADS, 1, 1] and how["grid"][1:] == ["1", "1"]
    drv.launch(fn, max(1, eval_size(how["grid"][0], sizes)), args)
    for a, ptr in zip(gk.ir.args, args):
        if a.kind == "tensor":
            drv.to_host(ptr, outs[a.name]) if a.access == "write" else drv.lib.cuMemFree_v2(ptr)
    return outs


GPU_SHAPES = [dict(B=3, C=5, IC=5, OC=3, H=7, W=5, HO=3, WO=2),
              dict(B=4, C=20, IC=16, OC=24, H=18, W=33, HO=9, WO=17)]   # > 256 per reduction, odd extents


@needs_nvcc
@pytest.mark.parametrize("sizes", GPU_SHAPES, ids=["small", "wide"])
def test_cuda_kernels_match_the_reference_on_a_gpu(tmp_path, sizes):
    drv = _driver()
    if drv is None:
        pytest.skip("no CUDA driver or GPU")
    checked = []
    for n, layer in enumerate(network_layers()):
        text, kernels = generate([layer], "cuda")
        (cubin,) = _compile_all({"layer": text}, tmp_path).values()
        env = layer_data(layer, sizes, {"K": 1, "S": 2, "epsilon": 2e-5}, np.random.default_rng(n))
        for gk in kernels:
            want = reference(gk, env, sizes, {"K": 1, "S": 2, "epsilon": 2e-5})
            for name, simple in [(gk.name, False)] + ([(gk.fallback, True)] if gk.fallback else []):
                got = run_on_gpu(drv, drv.function(cubin, name), gk, env, sizes, simple)
                for tensor, arr in got.items():
                    if arr.dtype.kind == "i":
                        np.testing.assert_array_equal(arr, want[tensor], err_msg=f"{name}: {tensor}")
                    else:
                        np.testing.assert_allclose(arr, want[tensor], rtol=RTOL, atol=ATOL * 10,
                                                   err_msg=f"{name}: {tensor}")
                checked.append(name)
    assert len(checked) == 18 + 8 + 6          # the fused layers' 8, the six tiled contractions' fallbacks
