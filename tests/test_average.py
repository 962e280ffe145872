"""Specification of fusion.fuse.average: weighted parameter averaging and interpolation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import WEIGHT_TOL
from torch import nn

from fusion.checks import check_weights
from fusion.errors import ArchitectureMismatchError, EnsembleError, NonFiniteWeightsError
from fusion.fuse.average import average, average_state_dicts, interpolate
from fusion.models import MLP, SmallResNet


def _resnets(count: int) -> list[nn.Module]:
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = SmallResNet(width=4)
        with torch.no_grad():  # distinct BatchNorm statistics and counters per model
            for k, m in enumerate(model.modules()):
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(10 * seed + k)
        models.append(model)
    return models


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_average_of_two_is_elementwise_mean() -> None:
    a, b = _resnets(2)
    merged = average([a, b])
    for key, value in merged.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, (a.state_dict()[key] + b.state_dict()[key]) / 2, atol=WEIGHT_TOL), key


def test_average_respects_weights_over_three_models() -> None:
    models = _resnets(3)
    weights = [0.5, 0.3, 0.2]
    merged = average(models, weights)
    key = "stages.1.0.conv1.weight"
    expected = sum(w * m.state_dict()[key] for w, m in zip(weights, models))
    assert torch.allclose(merged.state_dict()[key], expected, atol=WEIGHT_TOL)


def test_average_takes_integer_buffers_from_first_model() -> None:
    a, b = _resnets(2)
    merged = average([a, b])
    assert torch.equal(merged.bn1.num_batches_tracked, a.bn1.num_batches_tracked)
    assert not torch.equal(a.bn1.num_batches_tracked, b.bn1.num_batches_tracked)


def test_average_of_one_model_is_an_equal_copy() -> None:
    (a,) = _resnets(1)
    copy = average([a])
    assert copy is not a
    _assert_state_equal(copy, _snapshot(a))


def test_average_leaves_inputs_untouched() -> None:
    a, b = _resnets(2)
    before = [_snapshot(a), _snapshot(b)]
    average([a, b], [0.25, 0.75])
    _assert_state_equal(a, before[0])
    _assert_state_equal(b, before[1])


def test_average_keeps_class_and_mode() -> None:
    a, b = _resnets(2)
    a.eval()
    merged = average([a, b])
    assert type(merged) is SmallResNet and not merged.training


def test_interpolate_endpoints_are_the_models() -> None:
    a, b = _resnets(2)
    _assert_state_equal(interpolate(a, b, 0.0), _snapshot(a))
    at_one = interpolate(a, b, 1.0)
    for key, value in b.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(at_one.state_dict()[key], value, atol=WEIGHT_TOL), key


def test_interpolate_midpoint_equals_average() -> None:
    a, b = _resnets(2)
    mid, avg = interpolate(a, b, 0.5).state_dict(), average([a, b]).state_dict()
    for key in mid:
        assert torch.allclose(mid[key], avg[key], atol=WEIGHT_TOL), key


def test_interpolate_extrapolates_outside_unit_interval() -> None:
    a, b = _resnets(2)
    far = interpolate(a, b, 2.0)
    expected = 2 * b.conv1.weight - a.conv1.weight
    assert torch.allclose(far.conv1.weight, expected, atol=WEIGHT_TOL)


def test_average_state_dicts_keeps_dtype_of_half_precision() -> None:
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    b = {"w": torch.tensor([3.0, 5.0], dtype=torch.float16)}
    merged = average_state_dicts([a, b], [0.5, 0.5])
    assert merged["w"].dtype == torch.float16 and merged["w"].tolist() == [2.0, 3.5]


def test_average_state_dicts_names_differing_key() -> None:
    with pytest.raises(ArchitectureMismatchError, match="'extra'"):
        average_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(2), "extra": torch.zeros(1)}])


def test_average_rejects_empty_list() -> None:
    with pytest.raises(EnsembleError, match="at least 1"):
        average([])


@pytest.mark.parametrize(
    ("weights", "message"),
    [([1.0], "2 models|1 weights"), ([0.5, 0.2], "sum to 1"), ([1.5, -0.5], "non-negative"),
     ([math.nan, 1.0], "finite"), ([0.5, 0.5, 0.0], "3 weights")],
)
def test_average_rejects_bad_weights(weights: list[float], message: str) -> None:
    a, b = _resnets(2)
    with pytest.raises(EnsembleError, match=message):
        average([a, b], weights)


def test_check_weights_accepts_negative_only_when_allowed() -> None:
    assert check_weights([1.5, -0.5], 2, allow_negative=True) == [1.5, -0.5]
    assert check_weights(torch.tensor([0.25, 0.75]), 2) == [0.25, 0.75]
    assert check_weights(None, 4) == [0.25] * 4


def test_average_names_mismatched_parameter() -> None:
    with pytest.raises(ArchitectureMismatchError, match=r"layers\.1\.weight"):
        average([MLP(hidden=(8,)), MLP(hidden=(9,))])


def test_interpolate_names_model_b_on_mismatch() -> None:
    with pytest.raises(ArchitectureMismatchError, match="model_b"):
        interpolate(MLP(hidden=(8,)), MLP(hidden=(8, 8)), 0.5)


def test_average_rejects_non_finite_weights() -> None:
    a, b = MLP(hidden=(8,)), MLP(hidden=(8,))
    with torch.no_grad():
        b.layers[1].weight[0, 0] = math.inf
    with pytest.raises(NonFiniteWeightsError, match=r"models\[1\].*layers\.1\.weight"):
        average([a, b])


def test_interpolate_rejects_non_finite_alpha() -> None:
    a, b = _resnets(2)
    with pytest.raises(EnsembleError, match="alpha"):
        interpolate(a, b, math.inf)
