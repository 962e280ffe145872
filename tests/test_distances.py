"""Specification of fusion.analysis.distances: per-parameter / per-layer weight-space distances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fusion.analysis.distances import METRICS, LayerDistances, layer_distances, state_dict_distances
from fusion.errors import ArchitectureMismatchError, DataError


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def _pair() -> tuple[nn.Module, nn.Module]:
    """Two 2-layer nets with hand-chosen weights (a weight differing by (3, 4), a bias by 0)."""
    model_a = nn.Sequential(_linear([[1.0, 2.0]], [2.0]), nn.ReLU(), _linear([[0.0]], [0.0]))
    model_b = nn.Sequential(_linear([[4.0, 6.0]], [2.0]), nn.ReLU(), _linear([[3.0]], [0.0]))
    return model_a, model_b


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_per_parameter_distances_match_hand_computed_values() -> None:
    model_a, model_b = _pair()
    d = layer_distances(model_a, model_b)
    assert d.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    np.testing.assert_allclose(d.raw_l2, [5.0, 0.0, 3.0, 0.0])
    np.testing.assert_allclose(d.normalized_l2, [5.0 / math.sqrt(2), 0.0, 3.0, 0.0])
    np.testing.assert_array_equal(d.num_params, [2, 1, 1, 1])
    assert d.relative[0] == pytest.approx(5.0 / math.sqrt(5.0))


def test_relative_is_zero_for_zero_over_zero_and_inf_for_change_of_a_zero_tensor() -> None:
    model_a, model_b = _pair()
    d = layer_distances(model_a, model_b)
    assert d.relative[3] == 0.0  # bias 0 -> 0: 0/0 is defined as 0
    assert d.relative[2] == math.inf  # weight 0 -> 3: x/0 is inf
    assert d.relative[1] == 0.0  # bias 2 -> 2: 0/2


def test_module_aggregate_pools_weight_and_bias_of_a_layer() -> None:
    model_a, model_b = _pair()
    d = layer_distances(model_a, model_b, aggregate="module")
    assert d.names == ("0", "2")
    np.testing.assert_allclose(d.raw_l2, [5.0, 3.0])
    np.testing.assert_allclose(d.normalized_l2, [5.0 / math.sqrt(3), 3.0 / math.sqrt(2)])
    np.testing.assert_allclose(d.relative, [5.0 / 3.0, math.inf])  # ||W_a|| of layer 0 = sqrt(1 + 4 + 4) = 3
    np.testing.assert_array_equal(d.num_params, [3, 2])


def test_names_select_and_order_the_rows() -> None:
    model_a, model_b = _pair()
    d = layer_distances(model_a, model_b, names=["2.weight", "0.weight"])
    assert d.names == ("2.weight", "0.weight")
    np.testing.assert_allclose(d.raw_l2, [3.0, 5.0])


def test_unknown_name_raises_naming_it() -> None:
    model_a, model_b = _pair()
    with pytest.raises(ArchitectureMismatchError, match="1.weight"):
        layer_distances(model_a, model_b, names=["1.weight"])


def test_unknown_aggregate_raises() -> None:
    model_a, model_b = _pair()
    with pytest.raises(DataError, match="aggregate"):
        layer_distances(model_a, model_b, aggregate="block")


def test_identical_models_are_at_distance_zero() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    d = layer_distances(model, model)
    for metric in METRICS:
        assert np.all(d.metric(metric) == 0.0)


def test_distance_of_a_scaled_copy_is_relative_factor() -> None:
    model_a = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    model_b = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    model_b.load_state_dict({k: 1.5 * v for k, v in model_a.state_dict().items()})
    d = layer_distances(model_a, model_b, aggregate="module")
    np.testing.assert_allclose(d.relative, [0.5, 0.5], rtol=1e-6)


def test_different_architectures_raise_naming_the_parameter() -> None:
    model_a = nn.Sequential(nn.Linear(4, 3))
    model_b = nn.Sequential(nn.Linear(4, 5))
    with pytest.raises(ArchitectureMismatchError, match="0.weight"):
        layer_distances(model_a, model_b)


def test_buffers_are_compared_only_when_asked() -> None:
    model_a = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model_b = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model_b.load_state_dict(model_a.state_dict())
    with torch.no_grad():
        model_b[1].running_mean.fill_(2.0)
    assert "1.running_mean" not in layer_distances(model_a, model_b).names
    d = layer_distances(model_a, model_b, include_buffers=True)
    assert "1.num_batches_tracked" not in d.names  # integer buffers are skipped
    assert d.raw_l2[d.names.index("1.running_mean")] == pytest.approx(math.sqrt(8.0))


def test_inputs_are_untouched() -> None:
    model_a, model_b = _pair()
    before_a, before_b = _state(model_a), _state(model_b)
    layer_distances(model_a, model_b, aggregate="module")
    for before, model in ((before_a, model_a), (before_b, model_b)):
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key])


def test_most_moved_and_metric_accessors() -> None:
    model_a, model_b = _pair()
    d = layer_distances(model_a, model_b)
    assert d.most_moved("raw_l2") == "0.weight"
    assert d.most_moved("relative") == "2.weight"
    with pytest.raises(DataError, match="unknown distance metric"):
        d.metric("cosine")


def test_to_dict_holds_plain_lists() -> None:
    d = layer_distances(*_pair())
    as_dict = d.to_dict()
    assert as_dict["names"] == list(d.names)
    assert as_dict["raw_l2"] == pytest.approx([5.0, 0.0, 3.0, 0.0])
    assert isinstance(as_dict["num_params"][0], int)


def test_state_dict_distances_accepts_plain_tensors() -> None:
    d = state_dict_distances({"w": torch.zeros(4)}, {"w": torch.full((4,), 2.0)})
    assert isinstance(d, LayerDistances)
    assert d.raw_l2[0] == pytest.approx(4.0)
    assert d.normalized_l2[0] == pytest.approx(2.0)
    assert d.relative[0] == math.inf


def test_state_dict_distances_rejects_shape_mismatch() -> None:
    with pytest.raises(ArchitectureMismatchError, match="'w'"):
        state_dict_distances({"w": torch.zeros(4)}, {"w": torch.zeros(5)})
