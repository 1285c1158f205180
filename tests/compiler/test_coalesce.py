"""Loop coalescing on the C target: which nests become one plane loop, and which must not."""

from __future__ import annotations

from vggen.compiler.emit import generate
from vggen.compiler.pipeline import lower_layer
from vggen.compiler.targets.c.coalesce import coalesce_rows
from vggen.derive.autodiff import derive
from vggen.frontend.layers import (
    batch_normalization,
    convolution2d,
    max_pooling2d,
    relu,
)

SPEC = {"K": 1, "S": 2, "epsilon": 2e-5}


def test_bn_and_relu_loop_once_over_the_plane():
    for layer in (batch_normalization(), relu()):
        for k in lower_layer(layer, SPEC) + lower_layer(derive(layer).program, SPEC):
            text = next(g.text for g in generate([layer], "c")[1] if g.name == k.name)
            assert "for (int ij = 0; ij < H*W; ++ij)" in text, k.name
            assert "for (int j = 0; j < W; ++j)" not in text, k.name


def test_shifted_and_strided_reads_keep_their_loops():
    # the pooling backward reads sel[b, c, ⌊i/2⌋, ⌊j/2⌋]; the convolution's reads are shifted
    for layer in (max_pooling2d(2), convolution2d(1)):
        for k in lower_layer(derive(layer).program, SPEC):
            assert coalesce_rows(k) is k or all(lp.var.name != "ij" for lp in coalesce_rows(k).parallel), k.name
    (pool_back,) = lower_layer(derive(max_pooling2d(2)).program, SPEC)
    assert coalesce_rows(pool_back) is pool_back


def test_coalesced_kernels_keep_their_source_equation():
    _, kernels = generate([batch_normalization()], "c")
    g_x = next(k for k in kernels if k.name.endswith("g_x"))
    assert "//   g_x[b, c, i, j] =" in g_x.text
