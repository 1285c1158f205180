"""The compiler's stage boundaries: symbolic helpers, target-neutral IR, targets through one interface."""

import re

import pytest
import sympy as sp

from vggen.compiler.emit import generate, get_target
from vggen.compiler.ir import Kernel
from vggen.compiler.pipeline import lower_layer
from vggen.compiler.symbolic import flat_offset, nonneg, proved, row_major_offset
from vggen.compiler.targets.c.printer import CPrinter
from vggen.frontend.lang import Role, Tensor
from vggen.frontend.layers import convolution2d, vgg_layers

HELPER_CALL = re.compile(r"(?<![\w.])(vg_(?:imin|imax|select|floordiv|mod|block_sum|block_max|tile_choose|"
                         r"tile_outer|tile_inner|keep|gather|scatter|tile_outer_bf16|tile_inner_bf16|bf16_pairs|"
                         r"bf16_row|tile_outer_amx|tile_inner_amx|amx_granted)|VG_KEPT)\(")
# a macro that declares a buffer kept by vg_keep (templates/c/file.c.j2)
MACROS = {"VG_KEPT": "vg_keep"}


def test_offsets_agree_with_the_printed_access():
    b, i = sp.symbols("b i", integer=True)
    B, H = sp.symbols("B H", integer=True, positive=True)
    x = Tensor("x", (B, H), Role.INPUT, lower=(0, -1))
    acc = x.base[b, i + 1]
    assert flat_offset(acc, x) == sp.expand(row_major_offset(acc.indices, x)) == sp.expand(b * H + i + 2)
    assert CPrinter({"x": x}).code(acc) == f"x[{CPrinter({'x': x}).code(row_major_offset(acc.indices, x))}]"


def test_proofs_read_relationals_by_their_difference():
    i = sp.Symbol("i", integer=True)
    H = sp.Symbol("H", integer=True, positive=True)
    assert nonneg(sp.Ge(i, 1)) == i - 1 and nonneg(sp.Lt(i, H)) == H - i - 1
    assert proved(i, {i: (0, H - 1)}) and not proved(i - 1, {i: (0, H - 1)})


def test_kernel_records_carry_no_target_decision():
    fields = {f.name for f in Kernel.__dataclass_fields__.values()}
    assert not fields & {"schedule", "cuda", "cuda_split", "vector", "row", "gemm"}
    for k in lower_layer(convolution2d()):
        assert not hasattr(k, "cuda_split")


def test_each_file_defines_exactly_the_helpers_its_kernels_call():
    for target in ("c", "cuda"):
        text, kernels = generate(vgg_layers(), target)
        for g in kernels:
            assert {MACROS.get(h, h) for h in HELPER_CALL.findall(g.text)} == g.used, (target, g.name)
        assert get_target(target).name == target


def test_schedules_are_the_targets():
    _, c = generate([convolution2d()], "c")
    _, cu = generate([convolution2d()], "cuda")
    assert any(g.schedule.gemm is not None for g in c)
    assert {g.schedule.mode for g in cu} == {"thread", "block", "winograd"}


def test_a_shared_definition_is_emitted_once_and_must_agree():
    """Code several kernels call (the Winograd transforms) is defined once per
    file; two kernels giving one name two texts is an error, not a silent pick."""
    import dataclasses

    from vggen.compiler.targets.base import shared_definitions

    _, kernels = generate([convolution2d()], "c")
    variants = [g for g in kernels if g.algorithm is not None]
    assert len(shared_definitions(variants)) == 12 < sum(len(g.definitions) for g in variants)
    g = variants[0]
    name = next(iter(g.definitions))
    other = dataclasses.replace(g, definitions={name: g.definitions[name] + "\n// edited"})
    with pytest.raises(ValueError, match=name):
        shared_definitions([g, other])
