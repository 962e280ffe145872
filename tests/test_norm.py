"""Specification of fusion.fuse.norm: BatchNorm statistics reset and REPAIR."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import islice

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fusion.data import load_digits_data, make_loaders
from fusion.errors import ArchitectureMismatchError, DataError, EnsembleError, NonFiniteWeightsError
from fusion.evaluate import evaluate
from fusion.fuse.average import average, interpolate
from fusion.fuse.finetune import train_model
from fusion.fuse.norm import ChannelStats, neuron_statistics, repair, repair_locations, reset_bn_stats
from fusion.models import MLP, SmallResNet, VGGSmall

#: REPAIR's statistics must hit their targets to this relative precision (float32 activations).
STATS_RTOL = 1e-4
STATS_ATOL = 1e-5


@pytest.fixture(scope="module")
def digits() -> tuple[DataLoader, DataLoader]:
    return make_loaders(load_digits_data(seed=0), batch_size=128, seed=0)


@pytest.fixture(scope="module")
def trained_mlps(digits) -> list[nn.Module]:
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(train_model(MLP(hidden=(64, 64)), digits[0], epochs=3, lr=3e-3, seed=seed, progress=False))
    return models


def _seeded(factory, count: int = 2) -> list[nn.Module]:
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        models.append(factory())
    return models


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _assert_hits_targets(
    repaired: nn.Module, models: Sequence[nn.Module], weights: Sequence[float], data, layers=None
) -> None:
    locations = repair_locations(repaired, data, layers)
    assert locations
    got = neuron_statistics(repaired, data, locations)
    ends = [neuron_statistics(m, data, locations) for m in models]
    for name in locations:
        goal_mean = sum(w * s[name].mean for w, s in zip(weights, ends))
        goal_std = sum(w * s[name].std for w, s in zip(weights, ends))
        torch.testing.assert_close(got[name].mean, goal_mean, rtol=STATS_RTOL, atol=STATS_ATOL, msg=name)
        torch.testing.assert_close(got[name].std, goal_std, rtol=STATS_RTOL, atol=STATS_ATOL, msg=name)


# --- reset_bn_stats -----------------------------------------------------------------------------------


def _conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _uneven_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [2 + 3 * torch.randn(n, 1, 8, 8, generator=generator) for n in (7, 5, 3)]


def test_reset_bn_stats_is_exact_mean_and_unbiased_variance_over_uneven_batches() -> None:
    model, batches = _conv_bn(), _uneven_batches()
    with torch.no_grad():
        features = model[0](torch.cat(batches))  # (15, 4, 6, 6)
    reset = reset_bn_stats(model, batches, progress=False)
    torch.testing.assert_close(reset[1].running_mean, features.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reset[1].running_var, features.transpose(0, 1).flatten(1).var(1), rtol=1e-5, atol=1e-5)
    assert int(reset[1].num_batches_tracked) == 3


def test_reset_bn_stats_deeper_layers_see_batch_normalised_inputs(digits) -> None:
    torch.manual_seed(0)
    model = SmallResNet(width=4)
    batch = next(iter(digits[1]))[0][:32]
    captured = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: captured.__setitem__(n, args[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model.train()(batch)  # what BatchNorm sees in train mode on this batch
    for hook in hooks:
        hook.remove()
    reset = reset_bn_stats(model.eval(), [batch], progress=False)
    modules = dict(reset.named_modules())
    for name, x in captured.items():
        channels = x.transpose(0, 1).flatten(1)
        torch.testing.assert_close(modules[name].running_mean, channels.mean(1), rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(modules[name].running_var, channels.var(1), rtol=1e-4, atol=1e-5, msg=name)


def test_reset_bn_stats_turns_dropout_off() -> None:
    model = nn.Sequential(nn.Linear(64, 8), nn.Dropout(0.9), nn.BatchNorm1d(8))
    x = torch.randn(50, 64)
    with torch.no_grad():
        features = model[0](x)
    reset = reset_bn_stats(model, [x], progress=False)
    torch.testing.assert_close(reset[2].running_mean, features.mean(0), rtol=1e-5, atol=1e-5)


def test_reset_bn_stats_num_batches_uses_first_batches_only() -> None:
    model, batches = _conv_bn(), _uneven_batches()
    with torch.no_grad():
        features = model[0](batches[0])
    reset = reset_bn_stats(model, batches, num_batches=1, progress=False)
    torch.testing.assert_close(reset[1].running_mean, features.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert int(reset[1].num_batches_tracked) == 1


def test_reset_bn_stats_keeps_momentum_and_modes_and_input() -> None:
    model = _conv_bn().eval()
    model[1].momentum = 0.3
    state = _snapshot(model)
    reset = reset_bn_stats(model, _uneven_batches(), progress=False)
    assert reset is not model and _unchanged(model, state)
    assert reset[1].momentum == 0.3
    assert not any(m.training for m in reset.modules())


def test_reset_bn_stats_inplace_updates_the_model() -> None:
    model = _conv_bn()
    assert reset_bn_stats(model, _uneven_batches(), progress=False, inplace=True) is model
    assert int(model[1].num_batches_tracked) == 3


def test_reset_bn_stats_without_batch_norm_returns_an_equal_copy() -> None:
    model = MLP(hidden=(8,))
    copy = reset_bn_stats(model, [torch.randn(4, 64)], progress=False)
    assert copy is not model and _unchanged(copy, _snapshot(model))


@pytest.mark.parametrize(("data", "kwargs", "message"), [([], {}, "no batches"), (None, {}, "None"),
                                                          ([torch.randn(4, 1, 8, 8)], {"num_batches": 0}, "num_batches")])
def test_reset_bn_stats_rejects_bad_data(data, kwargs: dict, message: str) -> None:
    model = _conv_bn()
    state = _snapshot(model)
    with pytest.raises(DataError, match=message):
        reset_bn_stats(model, data, progress=False, **kwargs)
    assert _unchanged(model, state)


# --- repair -------------------------------------------------------------------------------------------


def test_repair_mlp_hits_target_statistics(trained_mlps, digits) -> None:
    merged = average(trained_mlps)
    repaired = repair(merged, trained_mlps, digits[0], progress=False)
    _assert_hits_targets(repaired, trained_mlps, [0.5, 0.5], digits[0])


def test_repair_with_interpolation_weights(trained_mlps, digits) -> None:
    merged = interpolate(*trained_mlps, 0.75)
    repaired = repair(merged, trained_mlps, digits[1], weights=[0.25, 0.75], progress=False)
    _assert_hits_targets(repaired, trained_mlps, [0.25, 0.75], digits[1])


@pytest.mark.parametrize(
    "factory",
    [lambda: SmallResNet(width=4, num_blocks=(1, 1)), lambda: VGGSmall(widths=(4, 8), hidden=(16,))],
    ids=["resnet", "vgg-bn"],
)
def test_repair_cnn_with_batch_norm_hits_target_statistics(factory, digits) -> None:
    models = [reset_bn_stats(m, digits[1], progress=False) for m in _seeded(factory)]
    repaired = repair(average(models), models, digits[1], progress=False)
    _assert_hits_targets(repaired, models, [0.5, 0.5], digits[1])


def test_repair_cnn_without_batch_norm_corrects_convolutions(digits) -> None:
    models = _seeded(lambda: VGGSmall(widths=(4, 8), hidden=(16,), batch_norm=False))
    repaired = repair(average(models), models, digits[1], progress=False)
    assert repair_locations(repaired, digits[1]) == ["features.0", "features.3", "classifier.0"]
    _assert_hits_targets(repaired, models, [0.5, 0.5], digits[1])


def test_repair_batch_norm_without_affine_parameters(digits) -> None:
    def factory() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16, affine=False), nn.ReLU(),
                             nn.Linear(16, 10))

    models = [reset_bn_stats(m, digits[1], progress=False) for m in _seeded(factory)]
    repaired = repair(average(models), models, digits[1], progress=False)
    _assert_hits_targets(repaired, models, [0.5, 0.5], digits[1])


def test_repair_linear_without_bias_matches_std(digits) -> None:
    models = _seeded(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 16, bias=False), nn.ReLU(), nn.Linear(16, 10)))
    repaired = repair(average(models), models, digits[1], progress=False)
    got, a, b = (neuron_statistics(m, digits[1], ["1"])["1"] for m in (repaired, *models))
    torch.testing.assert_close(got.std, (a.std + b.std) / 2, rtol=STATS_RTOL, atol=STATS_ATOL)


def test_repair_with_num_batches_uses_the_same_samples_in_every_pass(trained_mlps) -> None:
    split = load_digits_data(seed=0)
    loader = make_loaders(split, batch_size=64, seed=7)[0]  # shuffled
    repaired = repair(average(trained_mlps), trained_mlps, loader, num_batches=2, progress=False)
    first_two = list(islice(make_loaders(split, batch_size=64, seed=7)[0], 2))  # the same first epoch order
    _assert_hits_targets(repaired, trained_mlps, [0.5, 0.5], first_two)


def test_repair_lowers_the_midpoint_test_loss_of_two_digit_mlps(trained_mlps, digits) -> None:
    train, test = digits
    midpoint = interpolate(*trained_mlps, 0.5)
    before = evaluate(midpoint, test)
    after = evaluate(repair(midpoint, trained_mlps, train, progress=False), test)
    assert after.loss < before.loss
    assert after.accuracy >= before.accuracy


def test_repair_leaves_inputs_untouched(trained_mlps, digits) -> None:
    merged = average(trained_mlps).train()
    states = [_snapshot(m) for m in (merged, *trained_mlps)]
    modes = [m.training for m in trained_mlps]
    repaired = repair(merged, trained_mlps, digits[1], progress=False)
    assert repaired is not merged
    assert all(_unchanged(m, s) for m, s in zip((merged, *trained_mlps), states))
    assert merged.training and repaired.training and [m.training for m in trained_mlps] == modes


def test_repair_inplace_corrects_the_merged_model(trained_mlps, digits) -> None:
    merged = average(trained_mlps)
    weight = merged.layers[1].weight.detach().clone()
    assert repair(merged, trained_mlps, digits[1], progress=False, inplace=True) is merged
    assert not torch.equal(merged.layers[1].weight, weight)


def test_repair_only_named_layers(trained_mlps, digits) -> None:
    merged = average(trained_mlps)
    repaired = repair(merged, trained_mlps, digits[1], progress=False, layers=["layers.1"])
    assert torch.equal(repaired.layers[3].weight, merged.layers[3].weight)
    assert not torch.equal(repaired.layers[1].weight, merged.layers[1].weight)


def test_repair_locations_are_batch_norms_in_execution_order(digits) -> None:
    model = SmallResNet(width=4, num_blocks=(1, 1))
    assert repair_locations(model, digits[1]) == [
        "bn1", "stages.0.0.bn1", "stages.0.0.bn2", "stages.1.0.bn1", "stages.1.0.bn2", "stages.1.0.shortcut.1",
    ]


def test_repair_locations_of_mlp_skip_the_output_layer(digits) -> None:
    assert repair_locations(MLP(hidden=(8, 8, 8)), digits[1]) == ["layers.1", "layers.3", "layers.5"]


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(64, 8), nn.Linear(8, 8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.shared(torch.relu(self.shared(torch.relu(self.inp(x.flatten(1)))))))


def test_repair_locations_leave_out_layers_called_twice(digits) -> None:
    assert repair_locations(_Shared(), digits[1]) == ["inp"]


@pytest.mark.parametrize(("layers", "message"), [(["nope"], "nope"), (["layers.2"], "BatchNorm, Linear and Conv")])
def test_repair_rejects_unknown_or_unsupported_layers(trained_mlps, digits, layers, message: str) -> None:
    with pytest.raises(DataError, match=message):
        repair(average(trained_mlps), trained_mlps, digits[1], progress=False, layers=layers)


def test_repair_rejects_mismatched_architecture(trained_mlps, digits) -> None:
    with pytest.raises(ArchitectureMismatchError, match=r"layers\.1\.weight"):
        repair(MLP(hidden=(32, 64)), trained_mlps, digits[1], progress=False)


@pytest.mark.parametrize("weights", [[1.0], [0.7, 0.7], [2.0, -1.0]])
def test_repair_rejects_bad_weights(trained_mlps, digits, weights) -> None:
    with pytest.raises(EnsembleError):
        repair(average(trained_mlps), trained_mlps, digits[1], weights=weights, progress=False)


def test_repair_rejects_empty_data(trained_mlps) -> None:
    with pytest.raises(DataError, match="no batches"):
        repair(average(trained_mlps), trained_mlps, [], progress=False)


def test_repair_rejects_non_finite_endpoint(trained_mlps, digits) -> None:
    broken = average(trained_mlps)
    with torch.no_grad():
        broken.layers[3].bias[0] = math.nan
    with pytest.raises(NonFiniteWeightsError, match=r"models\[1\]"):
        repair(average(trained_mlps), [trained_mlps[0], broken], digits[1], progress=False)


def test_neuron_statistics_match_torch_reductions() -> None:
    model = _conv_bn()
    batches = _uneven_batches()
    stats = neuron_statistics(model, batches, ["0"])["0"]
    with torch.no_grad():
        features = model[0](torch.cat(batches)).transpose(0, 1).flatten(1).double()
    assert isinstance(stats, ChannelStats) and stats.count == 15 * 36
    torch.testing.assert_close(stats.mean, features.mean(1))
    torch.testing.assert_close(stats.var, features.var(1, unbiased=False))
