"""Backends: run one layer's kernels on concrete arrays.

One interface for every target.  A :class:`Backend` prepares a layer — a
forward ``Layer`` or a ``Backward.program`` — for concrete sizes once
(:meth:`Backend.program`, cached), and the resulting :class:`Program` is then
called as often as needed with a dict of arrays::

    prog = backend.program(layer, {"B": 8, "IC": 3, "OC": 16, "H": 32, "W": 32})
    out = prog({"x": x, "w": w})          # allocates y
    prog({"x": x, "w": w, "y": y})        # fills the given y in place

The dict must hold every input and parameter of the layer (for a backward
program: the forward's inputs, parameters and saved tensors, and the seeds
``g_<output>``).  Outputs, saved intermediates and gradients are written into
the arrays the dict already holds for them, or into fresh ones; the call
returns the dict of everything it computed.  Every array is float32 (int32
for integer tensors), C-contiguous, of exactly the tensor's shape.

Targets:

* ``numpy`` — the reference: evaluates the layer's own equations with
  :class:`vggen.proof.evaluate.Evaluator` in float64 (correctness over speed), in
  slabs of the first output axis so that the broadcast intermediates stay
  within a memory budget.
* ``c`` — the generated C kernels (``generated/c``), see
  :mod:`vggen.runtime.c`.
* ``cuda`` — the generated CUDA kernels through CuPy, see
  :mod:`vggen.runtime.cuda`.

The two kernel targets share :class:`KernelBackend` and :class:`KernelProgram`
(a layer's kernels in manifest order: arguments bound from the manifest's
signatures, every array checked before every call, the skip rule, the
profiler's hooks); a target supplies only how a kernel is looked up
(``function``), how a size argument is typed (``size_argument``), its launch
geometry (``geometry``) and how a bound call is launched (``launch``).

``get_backend("auto")`` picks cuda when CuPy and a GPU are present, else c.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import sympy as sp

from vggen.errors import VggenError
from vggen.frontend.lang import Layer
from vggen.manifest import ArgSpec, KernelSpec, check_manifest_shape, read_manifest
from vggen.runtime.algorithms import POLICIES as ALGORITHM_POLICIES
from vggen.runtime.algorithms import choose as choose_algorithm
from vggen.runtime.algorithms import cpu_name

# The convolution algorithms "auto" may choose under --precision bf16 (beside direct):
# F(2×2, 3×3) only, its bf16 error within about twice the direct kernels'.
BF16_ALGORITHMS = ("winograd2",)

DTYPES = {"float": np.dtype(np.float32), "int": np.dtype(np.int32)}


# --------------------------------------------------------------------------- sizes


def size_values(layer: Layer, sizes: Mapping[str, int]) -> dict:
    """SymPy substitutions for ``layer``: its size symbols and constants.

    ``sizes`` maps size names (``"B"``, ``"IC"``…) to integers; names the layer
    does not use are ignored, a size it needs and lacks is an error.
    """
    consts: dict = dict(layer.constants)
    for sym in sorted(layer.size_symbols, key=lambda s: s.name):
        if sym in consts:
            continue
        if sym.name not in sizes:
            need = ", ".join(sorted(s.name for s in layer.size_symbols if s not in layer.constants))
            raise VggenError(f"layer {layer.name}: no value for size {sym.name} (it needs {need})")
        value = sizes[sym.name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise VggenError(f"layer {layer.name}: size {sym.name} must be a positive integer, "
                             f"got {value!r}")
        consts[sym] = int(value)
    for name, value in sizes.items():     # a constant may be overridden by name (epsilon)
        for sym in layer.constants:
            if sym.name == name:
                consts[sym] = value
    return consts


def concrete(expr, consts: dict) -> int:
    v = sp.sympify(sp.sympify(expr).xreplace({k: sp.sympify(x) for k, x in consts.items()}))
    v = v if v.is_Integer else sp.simplify(v)
    if not v.is_Integer:
        raise VggenError(f"cannot evaluate {expr} to an integer with the sizes given (got {v})")
    return int(v)


def tensor_shapes(layer: Layer, consts: dict) -> dict[str, tuple[int, ...]]:
    out = {}
    for t in layer.tensors:
        shape = tuple(concrete(n, consts) for n in t.shape)
        if any(n < 1 for n in shape):
            raise VggenError(f"layer {layer.name}: tensor {t.name} would have shape {shape}")
        out[t.name] = shape
    return out


# --------------------------------------------------------------------------- checks


def describe(a) -> str:
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is None:
        return f"a {type(a).__name__}"
    layout = "C-contiguous" if _contiguous(a) else "not C-contiguous"
    return f"{type(a).__module__.split('.')[0]}.{type(a).__name__} {dtype} {tuple(shape)} ({layout})"


def _contiguous(a) -> bool:
    flags = getattr(a, "flags", None)
    return bool(flags is not None and flags.c_contiguous)


def check_argument(kernel: str, arg: str, a, shape: tuple, dtype: np.dtype,
                   array_type: type = np.ndarray) -> None:
    """Raise VggenError naming ``kernel`` and ``arg`` unless ``a`` is exactly right.

    Cheap on the good path (a type, dtype, shape and flag comparison), since it
    runs before every kernel call.
    """
    if (type(a) is array_type and a.dtype == dtype and a.shape == shape
            and a.flags.c_contiguous):
        return
    want = f"{array_type.__module__.split('.')[0]}.{array_type.__name__} {dtype} {shape} (C-contiguous)"
    if not isinstance(a, array_type):
        what = "has the wrong array type"
    elif a.dtype != dtype:
        what = "has the wrong dtype"
    elif a.shape != shape:
        what = "has the wrong shape"
    else:
        what = "is not C-contiguous"
    raise VggenError(f"kernel {kernel}: argument {arg} {what}: expected {want}, got {describe(a)}")


# --------------------------------------------------------------------------- programs


class Program:
    """A layer prepared for concrete sizes; call it with a dict of arrays."""

    def __init__(self, backend: "Backend", layer: Layer, sizes: Mapping[str, int]):
        self.backend = backend
        self.layer = layer
        self.consts = size_values(layer, sizes)
        self.sizes = {s.name: v for s, v in self.consts.items()}
        self.shapes = tensor_shapes(layer, self.consts)
        self.dtypes = {t.name: DTYPES[t.dtype] for t in layer.tensors}
        self.inputs = [t.name for t in layer.tensors if not t.role.is_computed]
        self.outputs = [t.name for t in layer.tensors if t.role.is_computed]

    @property
    def name(self) -> str:
        return self.layer.name

    def allocate(self, names: Iterable[str] | None = None) -> dict:
        """Fresh zeroed arrays for ``names`` (default: every computed tensor)."""
        names = self.outputs if names is None else names
        return {n: self.backend.zeros(self.shapes[n], self.dtypes[n]) for n in names}

    def __call__(self, arrays: Mapping[str, Any], skip: Iterable[str] = ()) -> dict:
        missing = [n for n in self.inputs if n not in arrays]
        if missing:
            raise VggenError(f"layer {self.name}: no array for {', '.join(missing)}")
        env = dict(arrays)
        for n in self.outputs:
            if n not in env:
                env[n] = self.backend.empty(self.shapes[n], self.dtypes[n])
        self.run(env, frozenset(skip))
        return {n: env[n] for n in self.outputs}

    def run(self, env: dict, skip: frozenset) -> None:   # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------- kernel programs


def manifest_dtype(arg: ArgSpec) -> np.dtype:
    """The array dtype of a tensor argument as the manifest declares it."""
    return DTYPES["int"] if arg.dtype.startswith("int") else DTYPES["float"]


class KernelCall:
    """One kernel of a program bound to concrete sizes: the target's function,
    its tensor arguments (name, shape, dtype, in signature order), its size
    arguments' values, what it writes, and the target's launch geometry."""

    __slots__ = ("spec", "fn", "tensors", "sizes", "writes", "geometry")

    def __init__(self, spec: KernelSpec, fn, tensors: tuple, sizes: tuple, geometry):
        self.spec, self.fn, self.tensors, self.sizes = spec, fn, tensors, sizes
        self.writes = frozenset(spec.writes)
        self.geometry = geometry

    @property
    def name(self) -> str:
        return self.spec.name


class BoundCall:
    """A kernel call with its arrays checked and bound, to launch on its own
    (the tuner replays single kernels)."""

    def __init__(self, backend: "KernelBackend", call: KernelCall, arrays: list):
        self.backend, self.call, self.arrays = backend, call, arrays

    @property
    def spec(self) -> KernelSpec:
        return self.call.spec

    @property
    def name(self) -> str:
        return self.call.name

    def __call__(self) -> None:
        self.backend.launch(self.call, self.arrays)


class KernelProgram(Program):
    """A layer's generated kernels for one target, in manifest order.

    Binding checks each kernel's signature against the layer once (every
    tensor argument is a tensor of the layer, of the manifest's dtype and
    shape; every size has a value); each call then checks its arrays.
    """

    def __init__(self, backend: "KernelBackend", layer: Layer, sizes: Mapping[str, int]):
        super().__init__(backend, layer, sizes)
        specs = backend.manifest.kernels_for(backend.manifest_target, layer)
        if not specs:
            raise VggenError(f"no {backend.manifest_target} kernels for layer {layer.name} in "
                             f"{backend.manifest.path}: regenerate the kernels (`vggen build`)")
        specs = [backend.algorithm_for(spec, self.sizes) for spec in specs]
        self.calls = [self.bind(spec) for spec in specs]
        # tensor -> the kernels of this program that read it: a skipped
        # gradient another kernel reads must still be computed
        self.readers: dict = {}
        for call in self.calls:
            for name, _, _ in call.tensors:
                if name not in call.writes:
                    self.readers.setdefault(name, set()).add(call.name)

    def bind(self, spec: KernelSpec) -> KernelCall:
        """``spec`` bound to this program's layer and sizes (checked)."""
        tensors, sizes = [], []
        for a in spec.args:
            if a.kind == "size":
                if a.name not in self.sizes:
                    raise VggenError(f"kernel {spec.name}: no value for size {a.name}")
                sizes.append(self.backend.size_argument(a, int(self.sizes[a.name])))
                continue
            if a.name not in self.shapes:
                raise VggenError(f"kernel {spec.name}: argument {a.name} is not a tensor of "
                                 f"layer {self.layer.name}")
            dtype = manifest_dtype(a)
            if dtype != self.dtypes[a.name]:
                raise VggenError(f"kernel {spec.name}: argument {a.name} is {a.dtype} in the "
                                 f"manifest but {self.dtypes[a.name]} in layer {self.layer.name}")
            check_manifest_shape(spec, a, self.shapes[a.name], self.sizes)
            tensors.append((a.name, self.shapes[a.name], dtype))
        return KernelCall(spec, self.backend.function(spec), tuple(tensors), tuple(sizes),
                          self.backend.geometry(spec, self.sizes))

    def skipped(self, call: KernelCall, skip: frozenset) -> bool:
        """Whether ``call`` only writes skipped tensors no other kernel reads."""
        return (bool(skip) and call.writes <= skip
                and not any(self.readers.get(w) for w in call.writes))

    def arguments(self, call: KernelCall, env: Mapping[str, Any]) -> list:
        """``call``'s arrays from ``env``, each checked."""
        array_type = self.backend.array_type
        out = []
        for name, shape, dtype in call.tensors:
            a = env[name]
            check_argument(call.name, name, a, shape, dtype, array_type)
            out.append(a)
        return out

    def launches(self, env: Mapping[str, Any]) -> list[BoundCall]:
        """Every kernel of the program bound to ``env``'s arrays (checked)."""
        return [self.backend.bound_call(self.backend, call, self.arguments(call, env))
                for call in self.calls]

    def run(self, env: dict, skip: frozenset) -> None:
        backend = self.backend
        for call in self.calls:
            if skip and self.skipped(call, skip):
                continue
            arrays = self.arguments(call, env)
            profiler = backend.profiler
            if profiler is not None:
                profiler.begin(call.name)
            backend.launch(call, arrays)
            if profiler is not None:
                profiler.end(call.name)


# --------------------------------------------------------------------------- backends


class Backend:
    """Runs layers on one target; holds the array library (``xp``) of its arrays."""

    name = "?"
    xp: Any = np
    array_type: type = np.ndarray
    profiler: Any = None    # when set: profiler.begin(kernel) / .end(kernel) around each call
    allow_modified_kernels = False    # whether it runs sources that differ from the manifest

    def __init__(self):
        self._programs: dict = {}

    # ---- layers
    def program(self, layer: Layer, sizes: Mapping[str, int]) -> Program:
        """``layer`` prepared for ``sizes`` (cached by layer name and sizes)."""
        key = (layer.name, id(layer), tuple(sorted(sizes.items())))
        prog = self._programs.get(key)
        if prog is None:
            prog = self._programs[key] = self._prepare(layer, sizes)
        return prog

    def run(self, layer: Layer, sizes: Mapping[str, int], arrays: Mapping[str, Any],
            skip: Iterable[str] = ()) -> dict:
        """Run ``layer``'s kernels; see the module docstring."""
        return self.program(layer, sizes)(arrays, skip)

    def _prepare(self, layer: Layer, sizes: Mapping[str, int]) -> Program:  # pragma: no cover
        raise NotImplementedError

    # ---- arrays
    def empty(self, shape, dtype=np.float32):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype=np.float32):
        return self.xp.zeros(shape, dtype=dtype)

    def asarray(self, host: np.ndarray, dtype=None):
        """A backend array (a copy on a device) of a host array."""
        return self.xp.array(host, dtype=dtype, order="C")

    def copy_in(self, dst, host: np.ndarray) -> None:
        """Copy a host array into the backend array ``dst`` (same shape)."""
        dst[...] = host

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a)

    def to_host_all(self, arrays) -> list[np.ndarray]:
        """Host copies of ``arrays``, waiting for the device once."""
        return [self.to_host(a) for a in arrays]

    def device_name(self) -> str:
        """The device the arrays live on, as measurements name it."""
        return cpu_name()

    def synchronize(self) -> None:
        pass

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


class KernelBackend(Backend):
    """A target of generated kernels listed in ``generated/manifest.json``.

    Its sources are checked against the manifest's hashes before a subclass
    compiles or loads anything (:meth:`vggen.manifest.Manifest.verify_sources`):
    edited ones are refused, or with ``allow_modified_kernels`` run with a
    warning.  Subclasses set ``manifest_target`` and implement the four hooks
    below.
    """

    manifest_target = "?"
    bound_call: type = BoundCall        # what KernelProgram.launches returns
    # whether "auto" falls back to the cost model of vggen.runtime.algorithms where
    # nothing was measured here (fit on a CPU: not for a GPU, which then runs direct)
    algorithm_model = True
    _conv_algorithm = "auto"
    _measured_here: bool | None = None

    def __init__(self, generated: str | Path | None = None, *, allow_modified_kernels: bool = False):
        super().__init__()
        self.manifest = read_manifest(generated)
        self.generated = self.manifest.root
        self.kernels = self.manifest.of_target(self.manifest_target)
        if not self.kernels:
            raise VggenError(f"{self.manifest.path} lists no {self.manifest_target} kernels: "
                             f"regenerate them (`vggen build`)")
        self.allow_modified_kernels = allow_modified_kernels
        # the sources that differ from the manifest (any only when allowed)
        self.modified = self.manifest.verify_sources(self.manifest_target, allow_modified_kernels)

    @property
    def specs(self) -> tuple[KernelSpec, ...]:
        """Every kernel of the manifest, of every target."""
        return self.manifest.kernels

    def _prepare(self, layer: Layer, sizes: Mapping[str, int]) -> KernelProgram:
        return KernelProgram(self, layer, sizes)

    @property
    def conv_algorithm(self) -> str:
        """Which algorithm runs a kernel that has several (vggen.runtime.algorithms):
        "auto" (measured, else the cost model's), or one forced where a kernel has it."""
        return self._conv_algorithm

    @conv_algorithm.setter
    def conv_algorithm(self, policy: str) -> None:
        if policy not in ALGORITHM_POLICIES:
            raise VggenError(f"unknown convolution algorithm {policy!r}: choose one of "
                             f"{', '.join(ALGORITHM_POLICIES)}")
        if policy != self._conv_algorithm:
            self._conv_algorithm = policy
            self._programs.clear()          # they hold the kernels chosen under the old policy

    def algorithm_for(self, spec: KernelSpec, sizes: Mapping[str, int]) -> KernelSpec:
        """The kernel that runs ``spec``'s work at ``sizes`` (``spec`` or another
        algorithm's kernel, see :mod:`vggen.runtime.algorithms`).  Under bf16 every
        kernel multiplies in bf16; "auto" there chooses among direct and the
        algorithms of ``BF16_ALGORITHMS`` only (F(4×4)'s transforms amplify bf16's
        rounding to about 3·10⁻² of the output's scale: tests/runtime/test_bf16.py)."""
        policy = self.conv_algorithm
        alternatives = self.manifest.alternatives(spec)
        if policy == "auto" and getattr(self, "precision", "fp32") != "fp32":
            alternatives = [alt for alt in alternatives if alt.algorithm in BF16_ALGORITHMS]
        return choose_algorithm(spec, alternatives, sizes, policy, self.measured_here, self.algorithm_model)

    @property
    def measured_here(self) -> bool:
        """Whether the manifest's measured algorithm choices for this target were
        measured on this device (:meth:`device_name`)."""
        if self._measured_here is None:
            record = (self.manifest.data.get("algorithms") or {}).get(self.manifest_target) or {}
            self._measured_here = bool(record) and record.get("device") == self.device_name()
        return self._measured_here

    # ---- the target's hooks
    def function(self, spec: KernelSpec):       # pragma: no cover - abstract
        """The callable kernel ``spec`` names (looked up once, cached)."""
        raise NotImplementedError

    def size_argument(self, arg: ArgSpec, value: int):
        """A size argument's value as the kernel takes it."""
        return value

    def geometry(self, spec: KernelSpec, sizes: Mapping[str, int]):
        """The launch geometry of ``spec`` at ``sizes`` (None: a plain call)."""
        return None

    def launch(self, call: KernelCall, arrays: list) -> None:   # pragma: no cover - abstract
        """Run ``call`` on its checked ``arrays`` (signature order)."""
        raise NotImplementedError
