"""The generated CUDA compiles: every ``generated/cuda/*.cu`` and the kernels of
layers outside VGG, with ``nvcc -arch=sm_90 -cubin`` (warnings are errors);
each kernel is in its cubin under its extern "C" name.  Skipped only where
nvcc is absent.

Where a CUDA driver and GPU are present too, every VGG kernel is launched
through the driver API (ctypes, as CuPy's RawModule would: by name, with the
manifest's launch shape) and compared with the NumPy reference.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from vggen.codegen import CUDA_THREADS, generate
from vggen.layers import convolution2d, max_pooling2d, vgg_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_codegen import (ATOL, RTOL, concrete, layer_data, leaky_relu,  # noqa: E402
                          reference, row_logsumexp)

REPO = Path(__file__).resolve().parent.parent
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
    assert len(files) == len(vgg_layers())
    cubins = _compile_all({f.stem: f.read_text() for f in files}, tmp_path)
    _, kernels = generate(vgg_layers(), "cuda")
    blob = b"".join(cubins.values())
    for k in kernels:
        assert k.name.encode() + b"\0" in blob, f"{k.name} is not in the cubins (extern \"C\" name)"


@needs_nvcc
def test_layers_outside_vgg_compile(tmp_path):
    text, kernels = generate([convolution2d(2), leaky_relu(), max_pooling2d(3), row_logsumexp()], "cuda")
    (cubin,) = _compile_all({"extra": text}, tmp_path).values()
    for k in kernels:
        assert k.name.encode() + b"\0" in cubin


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


def run_on_gpu(drv: Driver, fn, gk, env: dict, sizes: dict) -> dict:
    args, outs = [], {}
    for a in gk.ir.args:
        if a.kind == "size":
            args.append(ctypes.c_int(sizes[a.name]))
            continue
        shape = concrete(a.tensor.shape, sizes)
        dtype = np.int32 if a.dtype == "int32" else np.float32
        if a.access == "read":
            host = np.ascontiguousarray(env[a.name], dtype=dtype)
        else:
            host = np.full(shape, -12345 if dtype is np.int32 else np.nan, dtype=dtype)
            outs[a.name] = host
        args.append(drv.to_device(host))
    k = gk.ir
    total = int(np.prod([int(concrete([lp.extent], sizes)[0]) for lp in k.parallel]))
    grid = total if k.schedule.cuda == "block" else -(-total // CUDA_THREADS)
    drv.launch(fn, max(1, grid), args)
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
    for n, layer in enumerate(vgg_layers()):
        text, kernels = generate([layer], "cuda")
        (cubin,) = _compile_all({"layer": text}, tmp_path).values()
        env = layer_data(layer, sizes, {"K": 1, "S": 2, "epsilon": 2e-5}, np.random.default_rng(n))
        for gk in kernels:
            got = run_on_gpu(drv, drv.function(cubin, gk.name), gk, env, sizes)
            want = reference(gk, env, sizes, {"K": 1, "S": 2, "epsilon": 2e-5})
            for name, arr in got.items():
                if arr.dtype.kind == "i":
                    np.testing.assert_array_equal(arr, want[name], err_msg=f"{gk.name}: {name}")
                else:
                    np.testing.assert_allclose(arr, want[name], rtol=RTOL, atol=ATOL * 10,
                                               err_msg=f"{gk.name}: {name}")
            checked.append(gk.name)
    assert len(checked) == 18
