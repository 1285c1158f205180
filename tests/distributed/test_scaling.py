"""The scaling projection's model (``vggen.tools.scaling``): its limits hold."""

from __future__ import annotations

import math

from vggen.tools.scaling import LINKS, allreduce_seconds, efficiency, table

NV, IB = LINKS


def test_one_gpu_has_nothing_to_reduce_and_full_efficiency():
    assert allreduce_seconds(1, 1e9, IB) == 0.0
    assert efficiency(1, 0.01, IB, overlap=False) == efficiency(1, 0.01, IB, overlap=True) == 1.0


def test_two_gpus_move_the_message_once_each_way_plus_one_tree_level():
    assert math.isclose(allreduce_seconds(2, 45e9, IB), 2 * 6e-6 + 1.0)


def test_overlap_never_hurts_and_slower_links_or_shorter_steps_cost_more():
    for n in (8, 64, 512):
        for link in LINKS:
            assert efficiency(n, 0.01, link, True) >= efficiency(n, 0.01, link, False)
        assert efficiency(n, 0.01, NV, False) > efficiency(n, 0.01, IB, False)
        assert efficiency(n, 0.005, IB, False) < efficiency(n, 0.033, IB, False)


def test_the_table_has_a_row_per_link_and_size():
    rows = table(0.0334)
    assert [(r["link"], r["gpus"]) for r in rows] == [(l.name, n) for l in LINKS for n in (8, 64, 512)]
    assert all(0 < r["efficiency_no_overlap"] <= r["efficiency_overlap"] <= 1 for r in rows)
