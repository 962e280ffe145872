"""Seed 004 (Neuron Transplantation): the README's call form, the pruning ratio (``keep``) and BatchNorm
statistics re-estimated after transplanting (``data``)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fusion import ensemble_evaluate, evaluate, finetune, fuse_ensemble, reset_bn_stats
from fusion.data import get_data, make_loaders
from fusion.errors import EnsembleError
from fusion.models import MLP, VGGSmall
from fusion.spec import relative_difference


@pytest.fixture(scope="module")
def digits():
    return make_loaders(get_data("digits", seed=0), batch_size=64, seed=0)


@pytest.fixture(scope="module")
def trained_cnns(digits):
    """Two BatchNorm CNNs trained on the digits (about 93% test accuracy each)."""
    train, _ = digits
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = VGGSmall(in_channels=1, widths=(16, 32), hidden=(32,), num_classes=10)
        members.append(finetune(model, train, epochs=3, lr=3e-3, progress=False, seed=seed).eval())
    return members


def test_the_readme_example_runs_as_written(trained_cnns, digits) -> None:
    train_loader, _ = digits
    model0, model1 = trained_cnns

    models = [model0, model1]  # fully trained models, 2 or more

    for images, labels in train_loader:  # noqa: B007 (the seed's code, verbatim)
        example_inputs = images  # torch-pruning requires some example inputs to work
        break

    fused_model = fuse_ensemble(models, example_inputs)

    assert type(fused_model) is type(model0)
    assert {k: v.shape for k, v in fused_model.state_dict().items()} == {
        k: v.shape for k, v in model0.state_dict().items()}


def test_re_estimating_batchnorm_statistics_raises_one_shot_accuracy(trained_cnns, digits) -> None:
    train, test = digits
    x = next(iter(train))[0]
    plain = evaluate(fuse_ensemble(trained_cnns, x, progress=False), test).accuracy
    reestimated = evaluate(fuse_ensemble(trained_cnns, x, data=train, progress=False), test).accuracy
    assert reestimated > plain + 0.05  # measured: 0.38 -> 0.49


def test_data_gives_the_statistics_reset_bn_stats_computes(trained_cnns, digits) -> None:
    batches = list(itertools.islice(digits[0], 5))  # fixed batches: train-mode BN depends on their composition
    x = batches[0][0]
    expected = reset_bn_stats(fuse_ensemble(trained_cnns, x, progress=False), batches, progress=False)
    fused = fuse_ensemble(trained_cnns, x, data=batches, progress=False)
    for key, value in expected.state_dict().items():
        assert torch.allclose(fused.state_dict()[key].float(), value.float(), rtol=1e-5, atol=1e-6), key


def test_fine_tuning_is_the_second_half_and_recovers_accuracy(trained_cnns, digits) -> None:
    train, test = digits
    x = next(iter(train))[0]
    one_shot = evaluate(fuse_ensemble(trained_cnns, x, data=train, progress=False), test).accuracy
    tuned = evaluate(fuse_ensemble(trained_cnns, x, data=train, finetune_epochs=1, progress=False), test).accuracy
    assert tuned > one_shot + 0.2  # measured: 0.49 -> 0.87 (data is also the fine-tuning data)


def test_keeping_every_unit_is_the_ensemble(trained_cnns, digits) -> None:
    _, test = digits
    x = next(iter(test))[0]
    fused = fuse_ensemble(trained_cnns, x, keep=2.0, progress=False)
    with torch.no_grad():
        mean = sum(m(x) for m in trained_cnns) / 2
        assert relative_difference(mean, fused(x)) < 1e-5
    assert evaluate(fused, test).accuracy == pytest.approx(ensemble_evaluate(trained_cnns, test).accuracy, abs=0.01)


@pytest.mark.parametrize(("keep", "widths"), [(0.5, [8, 16, 16]), (1.5, [24, 48, 48]), (12, [12, 12, 12])])
def test_keep_sets_the_width_of_every_hidden_layer(trained_cnns, digits, keep, widths) -> None:
    x = next(iter(digits[0]))[0]
    fused = fuse_ensemble(trained_cnns, x, keep=keep, progress=False)
    hidden = [fused.features[0], fused.features[4], fused.classifier[0]]
    assert [layer.weight.shape[0] for layer in hidden] == widths
    assert fused.classifier[-1].weight.shape == (10, widths[-1])
    assert fused(x).shape == (len(x), 10)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keep": 0}, "positive"), ({"keep": True}, "positive"), ({"keep": 2.5}, "more than the 2 members"),
    ({"keep": 40}, "asks for 40 units"), ({"keep": 0.5, "schedule": "iterative"}, "schedule='all'"),
])
def test_bad_keep_values_are_refused(kwargs, message) -> None:
    members = [MLP(in_features=6, hidden=(16,), num_classes=3) for _ in range(2)]
    with pytest.raises(EnsembleError, match=message):
        fuse_ensemble(members, torch.randn(4, 6), progress=False, **kwargs)
