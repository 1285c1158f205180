"""The NodeKind registry: each record agrees with its own layer, and the
network's nodes take everything per kind from it."""

from __future__ import annotations

import numpy as np
import pytest

from vggen.frontend.lang import Role
from vggen.model.kinds import BN_KINDS, FUSED_KINDS, KINDS, running_weights
from vggen.model.network import build_nodes

SIZES = {"IC": 3, "OC": 4, "C": 5, "H": 2, "W": 2, "HO": 1, "WO": 1}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_a_kinds_parameters_are_its_layers(name):
    kind = KINDS[name]
    assert kind.name == name
    params = [t.name for t in kind.layer.tensors if t.role is Role.PARAMETER]
    assert list(kind.parameters) == params
    assert kind.output in kind.layer.by_name and kind.layer.by_name[kind.output].role.is_computed
    if kind.initialise is None:
        assert not params
        return
    values = kind.initialise(SIZES, np.random.default_rng(0))
    assert list(values) == params
    for tensor, value in values.items():
        assert value.dtype == np.float32 and value.ndim == len(kind.layer.by_name[tensor].shape)


def test_statistics_kinds_evaluate_with_the_running_statistics_given():
    assert BN_KINDS == ("bn", "bn_relu", "bn_relu_dropout")
    for name in BN_KINDS:
        layer = KINDS[name].evaluation_layer
        assert not layer.by_name["mu"].role.is_computed and not layer.by_name["var"].role.is_computed
        assert "R" not in layer.by_name                  # dropout, the identity, left out


def test_fused_kinds_replace_runs_of_kinds_longest_first():
    assert [k.name for k in FUSED_KINDS] == ["bn_relu_dropout", "bn_relu"]
    for fused in FUSED_KINDS:
        assert all(part in KINDS for part in fused.parts)
        assert fused.parameters == KINDS[fused.parts[0]].parameters
        assert fused.has_mask == ("dropout" in fused.parts)


def test_only_dropout_is_the_identity_in_evaluation():
    assert [n for n, k in KINDS.items() if k.identity_in_evaluation] == ["dropout"]
    assert [n for n, k in KINDS.items() if k.reads_labels] == ["loss"]


def test_nodes_take_their_layers_from_their_kind():
    for fuse in (False, True):
        for node in build_nodes(width=2, fuse=fuse):
            kind = KINDS[node.kind]
            assert node.layer is kind.layer and node.backward is kind.backward
            assert node.params == {t: f"{node.name}.{t}" for t in kind.parameters}


def test_running_weights_make_the_variance_unbiased():
    np.testing.assert_allclose(running_weights(4), [0.9, 0.1, 0.1 * 4 / 3], rtol=1e-6)
    np.testing.assert_allclose(running_weights(1), [0.9, 0.1, 0.1], rtol=1e-6)
