"""The identifiers of generated code: the targets' own, and the users' mapped clear of them.

Every name a template declares carries the prefix ``vg_`` (``VG_`` for
constants), which the analysis refuses to a user's tensor, index or size;
a family of names built from a user's name (``vg_a_r_<index>``) has a
prefix that no fixed name and no other family starts with.  What is left
are the names of the languages and libraries themselves (``free``,
``threadIdx``, ``expf``, ``float4``…): a user name among them, or one that
starts with ``VG_`` or ``__`` (reserved to the implementation), is printed as
``vg_u_<name>``, which no template and no other user name can produce.  The
mapping is for printing only: the manifest and the runtimes keep the names
as written.
"""

from __future__ import annotations

from vggen.frontend.functions import FUNCTIONS

# C++ keywords (nvcc compiles CUDA as C++; C's own the analysis refuses already)
_CXX = """alignas alignof and and_eq asm bitand bitor bool catch char16_t char32_t char8_t class
co_await co_return co_yield compl concept const_cast consteval constexpr constinit decltype delete
dynamic_cast explicit export false friend mutable namespace new noexcept not not_eq nullptr operator
or or_eq private protected public reinterpret_cast requires static_assert static_cast template this
thread_local throw true try typeid typename using virtual wchar_t xor xor_eq"""
# what the templates and printers call or name besides their vg_ names: libc, libm, OpenMP,
# CUDA built-ins and vector types
_LIBRARY = """free size_t aligned_alloc malloc fprintf printf stderr abort NULL INFINITY NAN int32_t
int64_t uint32_t omp_get_max_threads fabsf fmaxf fminf floorf fmodf powf sqrtf log1pf abs min max
threadIdx blockIdx blockDim gridDim warpSize __syncthreads __threadfence atomicAdd __ldcg float2
float4 make_float2 make_float4 __int_as_float __launch_bounds__ __global__ __device__ __shared__
__constant__ __restrict__ __forceinline__ __noinline__ __align__"""

TARGET_NAMES = frozenset(_CXX.split()) | frozenset(_LIBRARY.split()) \
    | {f.c for f in FUNCTIONS} | {f.cuda for f in FUNCTIONS} | {f.c_int for f in FUNCTIONS if f.c_int}

USER_PREFIX = "vg_u_"


def identifier(name: str) -> str:
    """A user's tensor, index or size name as the generated code spells it."""
    if name in TARGET_NAMES or name.startswith(("VG_", "__")):
        return USER_PREFIX + name
    return name


__all__ = ["TARGET_NAMES", "USER_PREFIX", "identifier"]
