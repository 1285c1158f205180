"""The tiled CUDA contractions, run on the CPU: the generated ``.cu`` compiled as
C++ with a small shim and compared with the NumPy reference.

The shim maps the CUDA built-ins the kernels use onto plain C++:
``__shared__`` → ``static`` (blocks run one after another, so a static is
the block's shared memory), ``__device__`` globals → globals, atomics and
fences → plain operations; each thread of a block is a ``ucontext``
coroutine, and ``__syncthreads`` switches to the next thread until every
thread has reached the barrier (a thread that finishes while others wait at
a barrier is reported: a divergent barrier).  So the indexing, guards,
vector-load fallbacks, double buffering, grid striding and the split-K
last-block reduction all run as written; what it cannot show is timing,
memory ordering between real concurrent blocks, or float4 alignment faults
(the alignment tests check the addresses instead).

Every tile configuration and split count is forced through the kernels'
autotuning hook (``vg_tune_<kernel>``), on odd shapes, several grid sizes
and misaligned operands; the device's choice of (configuration, splits)
must equal ``cuda_schedule.choose``.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import concrete, layer_data, reference
from vggen.compiler.emit import generate
from vggen.compiler.targets.cuda import schedule as cuda_schedule
from vggen.compiler.targets.cuda.printer import CudaPrinter
from vggen.frontend.lang import Equation, Layer, Role, Sum, Tensor, indices
from vggen.frontend.layers import IC, B, C, convolution2d, linear

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None or sys.platform != "linux", reason="needs g++ and ucontext (Linux)")
SPECIALISE = {"K": 1, "S": 2, "epsilon": 2e-5}

SHIM = r"""
// CUDA on the CPU, for tests (tests/test_cuda_emulation.py)
#include <ucontext.h>
#include <math.h>
#include <cstring>
#include <functional>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct vg_dim3 { unsigned int x, y, z; };
static vg_dim3 threadIdx, blockIdx, blockDim, gridDim;
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
static inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
static inline float2 make_float2(float a, float b) { return float2{a, b}; }
static inline float4 __ldcg(const float4 *p) { return *p; }
static inline float __ldcg(const float *p) { return *p; }
static inline void __threadfence() {}
static inline unsigned int atomicAdd(unsigned int *p, unsigned int v) { unsigned int o = *p; *p = o + v; return o; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
namespace vg_emu {
static ucontext_t main_ctx;
static std::vector<ucontext_t> ctx;
static std::vector<char> stacks;
static std::vector<int> state;          // 0 runnable, 1 at a barrier, 2 returned
static int cur;
static std::function<void()> body;
static const size_t STACK = 256 * 1024;
static long long misaligned;            // vector accesses at addresses not aligned to their size
static long long vectors;               // vector accesses (shared and global)
static void entry() { body(); state[cur] = 2; }
static int launch(unsigned gx, unsigned bx, std::function<void()> fn)
{
    body = fn;
    gridDim = vg_dim3{gx, 1, 1};
    blockDim = vg_dim3{bx, 1, 1};
    ctx.resize(bx);
    stacks.resize(bx * STACK);
    state.assign(bx, 0);
    for (unsigned b = 0; b < gx; ++b)
    {
        blockIdx = vg_dim3{b, 0, 0};
        for (unsigned t = 0; t < bx; ++t)
        {
            getcontext(&ctx[t]);
            ctx[t].uc_stack.ss_sp = &stacks[t * STACK];
            ctx[t].uc_stack.ss_size = STACK;
            ctx[t].uc_link = &main_ctx;
            makecontext(&ctx[t], entry, 0);
            state[t] = 0;
        }
        for (;;)
        {
            for (unsigned t = 0; t < bx; ++t)
                if (state[t] == 0)
                {
                    cur = (int)t;
                    threadIdx = vg_dim3{t, 0, 0};
                    swapcontext(&main_ctx, &ctx[t]);
                }
            unsigned done = 0, waiting = 0;
            for (unsigned t = 0; t < bx; ++t)
                (state[t] == 2 ? done : waiting)++;
            if (done == bx) break;
            if (done) return -1;           // some threads returned, others wait at a barrier
            for (unsigned t = 0; t < bx; ++t) state[t] = 0;
        }
    }
    return 0;
}
}
static void __syncthreads()
{
    vg_emu::state[vg_emu::cur] = 1;
    swapcontext(&vg_emu::ctx[vg_emu::cur], &vg_emu::main_ctx);
}
"""


def shifted_product() -> Layer:
    """Not in VGG, other names: out(u,v) = Σ_t 3·alpha(t, u+1)·beta(v, t), alpha
    zero outside (a guard on A, a coefficient, a shifted index map)."""
    u, v, t = indices("u v t")
    alpha = Tensor("alpha", (IC, B), Role.INPUT, zero_outside=True)
    beta = Tensor("beta", (C, IC), Role.PARAMETER)
    out = Tensor("out", (B, C), Role.OUTPUT)
    return Layer("ShiftedProduct", [alpha, beta, out],
                 [Equation(out[u, v], Sum(3 * alpha[t, u + 1] * beta[v, t], (t, 0, IC)), "")])


LAYERS = (convolution2d, lambda: convolution2d(2), linear, shifted_product)


def _emulation_source(text: str, kernels) -> str:
    # count misaligned vector accesses (a GPU would fault): wrap the reinterpret_casts
    text = text.replace("*reinterpret_cast<const float4 *>(p)", "*vg_emu_check<const float4>(p)")
    text = text.replace("*reinterpret_cast<const float2 *>(p)", "*vg_emu_check<const float2>(p)")
    text = text.replace("*reinterpret_cast<float4 *>(p)", "*vg_emu_check<float4>(p)")
    text = text.replace("*reinterpret_cast<float2 *>(p)", "*vg_emu_check<float2>(p)")
    check = r"""
template <class T, class P> static inline T *vg_emu_check(P *p)
{
    if ((unsigned long long)(const void *)p % sizeof(T)) ++vg_emu::misaligned;
    ++vg_emu::vectors;
    return reinterpret_cast<T *>(p);
}
"""
    out = [SHIM, check, text]
    for g in kernels:
        k = g.ir
        p = CudaPrinter(k.tensors)
        args = ", ".join(p.ident(a.name) for a in k.args)
        out.append(f'extern "C" int vg_emu_run_{k.name}({p.params(k.args)}, unsigned vg_grid)\n'
                   f'{{ return vg_emu::launch(vg_grid, VG_THREADS, [=]() {{ {k.name}({args}); }}); }}\n')
        if g.tiled is not None:
            out.append(f'extern "C" void vg_emu_tune_{k.name}(int v) {{ vg_tune_{k.name} = v; }}\n')
    if not any(g.tiled is not None for g in kernels):
        return "\n".join(out)
    out.append(r"""
extern "C" void vg_emu_choose(int M, int N, int K, int G, int tune, int *config, int *splits)
{ vg_tile_choose(M, N, K, G, tune, config, splits); }
extern "C" unsigned long long vg_emu_counters()
{ unsigned long long s = 0; for (int t = 0; t < VG_SPLITK_TILES; ++t) s += vg_splitk_count[t]; return s; }
extern "C" long long vg_emu_misaligned() { long long m = vg_emu::misaligned; vg_emu::misaligned = 0; return m; }
extern "C" long long vg_emu_vectors() { long long m = vg_emu::vectors; vg_emu::vectors = 0; return m; }
""")
    return "\n".join(out)


def compile_emulation(text: str, kernels, where: Path, probe: str = "") -> ctypes.CDLL:
    """Generated CUDA ``text`` (of ``kernels``) compiled for the CPU, with ``probe``
    (extra C++ a test reads the kernels' state through) appended."""
    src = where / "emu.cpp"
    src.write_text(_emulation_source(text, kernels) + probe)
    lib = where / "emu.so"
    res = subprocess.run([CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", str(src), "-o", str(lib)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    dll = ctypes.CDLL(str(lib))
    if any(g.tiled is not None for g in kernels):
        dll.vg_emu_counters.restype = ctypes.c_ulonglong
    return dll


def _emulate(layers, where: Path):
    """(library, kernels by name): ``layers``' CUDA kernels compiled for the CPU."""
    text, kernels = generate(layers, "cuda", SPECIALISE)
    return compile_emulation(text, kernels, where), {g.name: g for g in kernels}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return _emulate([make() for make in LAYERS], tmp_path_factory.mktemp("emu"))


def _run(lib, gk, env: dict, sizes: dict, grid: int, tune: int = 0, offset: int = 0) -> dict:
    """One launch; every tensor read starts ``offset`` floats into its buffer
    (offset 1: not 16-byte aligned), every written one is pre-filled with NaN."""
    k = gk.ir
    args, keep, outs = [], [], {}
    for a in k.args:
        if a.kind == "size":
            args.append(ctypes.c_int(sizes[a.name]))
            continue
        shape = concrete(a.tensor.shape, sizes)
        dtype = np.int32 if a.dtype.startswith("int") else np.float32
        if a.access == "read":
            buf = np.zeros(int(np.prod(shape)) + offset + 4, dtype=dtype)
            buf[offset:offset + int(np.prod(shape))] = np.asarray(env[a.name], dtype=dtype).ravel()
            keep.append(buf)
            args.append(ctypes.c_void_p(buf.ctypes.data + 4 * offset))
        else:
            arr = np.full(shape, -1 if dtype is np.int32 else np.nan, dtype=dtype)
            outs[a.name] = arr
            keep.append(arr)
            args.append(arr.ctypes.data_as(ctypes.c_void_p))
    if gk.tiled is not None:
        getattr(lib, f"vg_emu_tune_{k.name}")(ctypes.c_int(tune))
    rc = getattr(lib, f"vg_emu_run_{k.name}")(*args, ctypes.c_uint(grid))
    assert rc == 0, f"{k.name}: divergent __syncthreads"
    if gk.tiled is not None:
        getattr(lib, f"vg_emu_tune_{k.name}")(ctypes.c_int(0))
        assert lib.vg_emu_counters() == 0, f"{k.name}: split-K counters not reset"
    return outs


def _check(gk, got: dict, want: dict, what: str):
    for name, arr in got.items():
        np.testing.assert_allclose(arr, want[name], rtol=1e-4, atol=1e-4, err_msg=f"{gk.name} {what}: {name}")


CONV_SIZES = [dict(B=2, IC=3, OC=5, H=7, W=6), dict(B=3, IC=7, OC=37, H=5, W=9), dict(B=1, IC=1, OC=2, H=2, W=3)]
LINEAR_SIZES = [dict(B=70, IC=37, C=150), dict(B=5, IC=64, C=10), dict(B=3, IC=2, C=3)]


def _cases(emulated):
    lib, kernels = emulated
    for layer, shapes in ((convolution2d(), CONV_SIZES), (convolution2d(2), CONV_SIZES[:2]), (linear(), LINEAR_SIZES),
                          (shifted_product(), LINEAR_SIZES)):
        _, ks = generate([layer], "cuda", SPECIALISE)
        for n, sizes in enumerate(shapes):
            env = layer_data(layer, sizes, SPECIALISE, np.random.default_rng(n))
            for g in ks:
                if g.tiled is not None:
                    yield kernels[g.name], env, sizes


def test_every_configuration_and_split_matches_the_reference(emulated):
    lib = emulated[0]
    checked = set()
    for gk, env, sizes in _cases(emulated):
        want = reference(gk, env, sizes, SPECIALISE)
        n_configs = len(gk.tiled.configs)
        for config in range(n_configs):
            for splits, grid in ((1, 3), (3, 5), (64, 2)):
                tune = cuda_schedule.tune_value(config, splits)
                _check(gk, _run(lib, gk, env, sizes, grid, tune), want, f"config {config} splits {splits} grid {grid}")
        _check(gk, _run(lib, gk, env, sizes, 1), want, "heuristic, grid 1")
        checked.add(gk.name)
    assert len(checked) == 12         # shiftedproduct_backward_g_alpha too: its guard encloses the product


def test_results_do_not_depend_on_the_grid_and_are_deterministic(emulated):
    lib = emulated[0]
    for gk, env, sizes in _cases(emulated):
        for config, splits in ((1, 4), (3, 2), (0, 1)):
            tune = cuda_schedule.tune_value(config, splits)
            runs = [_run(lib, gk, env, sizes, grid, tune) for grid in (1, 2, 7)]
            for other in runs[1:]:
                for name in runs[0]:
                    assert np.array_equal(runs[0][name], other[name]), (gk.name, config, splits)


def test_misaligned_operands_take_the_scalar_path(emulated):
    lib = emulated[0]
    lib.vg_emu_misaligned.restype = ctypes.c_longlong
    lib.vg_emu_misaligned()
    for gk, env, sizes in _cases(emulated):
        want = reference(gk, env, sizes, SPECIALISE)
        for config in range(len(gk.tiled.configs)):
            tune = cuda_schedule.tune_value(config, 2)
            for offset in (1, 2):
                _check(gk, _run(lib, gk, env, sizes, 3, tune, offset), want, f"config {config} offset {offset}")
        assert lib.vg_emu_misaligned() == 0, gk.name
    # and the vector path is taken where the operands are aligned: more vector accesses than misaligned
    lib.vg_emu_vectors.restype = ctypes.c_longlong
    sizes = dict(B=8, IC=64, C=32)
    env = layer_data(linear(), sizes, SPECIALISE, np.random.default_rng(0))
    for name in ("linear_forward_y", "linear_backward_g_x", "linear_backward_g_w"):
        gk = emulated[1][name]
        want = reference(gk, env, sizes, SPECIALISE)
        counts = []
        for offset in (0, 1):
            lib.vg_emu_vectors()
            _check(gk, _run(lib, gk, env, sizes, 2, cuda_schedule.tune_value(3, 1), offset), want, f"offset {offset}")
            counts.append(lib.vg_emu_vectors())
        assert counts[0] > counts[1], (name, counts)
    assert lib.vg_emu_misaligned() == 0


VGG_SHAPES = [(ic, oc, hw) for ic, oc, hw in [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8),
                                              (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 2)]]


def test_the_device_choice_is_cuda_schedule_choose(emulated):
    lib = emulated[0]
    shapes = []
    for batch in (64, 256):
        for ic, oc, hw in VGG_SHAPES:
            n = batch * hw * hw
            shapes += [(oc, n, 9 * ic), (ic, n, 9 * oc), (oc, 9 * ic, n)]
        shapes += [(batch, 512, 512), (batch, 10, 512), (512, 10, batch), (512, 512, batch), (batch, 512, 10)]
    rng = np.random.default_rng(0)
    shapes += [tuple(int(v) for v in rng.integers(1, 5000, size=3)) for _ in range(200)]
    config, splits = ctypes.c_int(), ctypes.c_int()
    for M, N, K in shapes:
        for G in (1, 132, cuda_schedule.PERSISTENT_BLOCKS, 1000):
            for tune in (0, 1, 8, 20):
                lib.vg_emu_choose(M, N, K, G, tune, ctypes.byref(config), ctypes.byref(splits))
                assert (config.value, splits.value) == cuda_schedule.choose(M, N, K, G, tune), (M, N, K, G, tune)


# --------------------------------------------------------------------------- every other kernel


def test_every_network_kernel_runs_in_emulation():
    """The kernels of every other class (elementwise, block and thread
    reductions with their fused passes, split reductions, window argmax,
    softmax rows), the fused layers' included: the emulated CUDA equals the
    NumPy reference, on odd shapes, with a grid smaller than the work (grid
    striding) and one large enough to split each output's reduction."""
    import tempfile

    from vggen.frontend.layers import network_layers

    layers = [layer for layer in network_layers() if layer.name not in ("Convolution2D", "Linear")]
    with tempfile.TemporaryDirectory() as where:
        lib, kernels = _emulate(layers, Path(where))
        checked = set()
        for n, layer in enumerate(layers):
            _, ks = generate([layer], "cuda", SPECIALISE)
            for sizes in (dict(B=3, C=5, H=3, W=5, HO=2, WO=3), dict(B=2, C=3, H=17, W=19, HO=1, WO=2)):
                env = layer_data(layer, sizes, SPECIALISE, np.random.default_rng(n))
                for g in ks:
                    if g.tiled is not None:
                        continue
                    gk = kernels[g.name]
                    want = reference(gk, env, sizes, SPECIALISE)
                    # a grid smaller than the outputs; one that splits each output's reduction
                    for grid in (2, 40):
                        _check(gk, _run(lib, gk, env, sizes, grid), want, f"{sizes}, grid {grid}")
                    checked.add(g.name)
    assert checked == set(kernels)
    assert len([k for k in checked if k.startswith("batchnormalization_relu")]) == 8


def test_split_reductions_share_the_grid_and_reset_their_counters(tmp_path):
    """∂L/∂γ, ∂L/∂β of BN with 3 channels on 40 blocks: 13 splits per channel;
    deterministic (the same bits from two launches), and the ticket counters
    back at 0 for the next launch."""
    from vggen.frontend.layers import batch_normalization

    layer = batch_normalization()
    text, kernels = generate([layer], "cuda", SPECIALISE)
    (gk,) = [g for g in kernels if g.schedule.split]
    assert gk.name == "batchnormalization_backward_g_gamma_g_beta"
    probe = (f'extern "C" unsigned vg_emu_rcount() {{ unsigned s = 0; for (int i = 0; i < 264; ++i) '
             f's += vg_rcount_{gk.name}[i]; return s; }}\n')
    lib = compile_emulation(text, kernels, tmp_path, probe)
    sizes = dict(B=3, C=3, H=9, W=11)
    env = layer_data(layer, sizes, SPECIALISE, np.random.default_rng(0))
    want = reference(gk, env, sizes, SPECIALISE)
    runs = [_run(lib, gk, env, sizes, 40) for _ in range(2)]
    _check(gk, runs[0], want, "split")
    assert all(np.array_equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert lib.vg_emu_rcount() == 0
