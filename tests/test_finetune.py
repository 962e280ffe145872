"""Specification of the training/evaluation layer: fusion.fuse.finetune and fusion.evaluate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fusion.data import load_digits_data, make_loaders
from fusion.errors import DataError, EnsembleError, NonFiniteWeightsError
from fusion.evaluate import Evaluation, ensemble_evaluate, evaluate, predict_logits
from fusion.fuse.finetune import FinetuneResult, finetune, finetune_with_history, train_model
from fusion.models import MLP


@pytest.fixture(scope="module")
def loaders() -> tuple[DataLoader, DataLoader]:
    return make_loaders(load_digits_data(seed=0, flatten=True), batch_size=128, seed=0)


def _dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- finetune -----------------------------------------------------------------------------------------


def test_finetune_lowers_the_training_loss(loaders) -> None:
    train, _ = loaders
    model = MLP(hidden=(32,))
    before = evaluate(model, train).loss
    after = evaluate(finetune(model, train, epochs=2, lr=1e-2, progress=False), train).loss
    assert after < 0.5 * before


def test_finetune_returns_a_trained_copy_and_leaves_the_input(loaders) -> None:
    model = MLP(hidden=(16,))
    state = _snapshot(model)
    trained = finetune(model, loaders[0], max_steps=3, progress=False)
    assert trained is not model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not torch.equal(trained.layers[1].weight, model.layers[1].weight)


def test_finetune_inplace_trains_the_model_itself(loaders) -> None:
    model = MLP(hidden=(16,))
    weight = model.layers[1].weight.detach().clone()
    assert finetune(model, loaders[0], max_steps=2, inplace=True, progress=False) is model
    assert not torch.equal(model.layers[1].weight, weight)


def test_finetune_same_seed_gives_same_weights_with_dropout(loaders) -> None:
    torch.manual_seed(3)
    model = _dropout_mlp()
    runs = [finetune(model, make_loaders(load_digits_data(flatten=True), 128, seed=0)[0], max_steps=4, seed=s,
                     progress=False) for s in (5, 5, 6)]
    assert torch.equal(runs[0][0].weight, runs[1][0].weight)
    assert not torch.equal(runs[0][0].weight, runs[2][0].weight)


def test_finetune_does_not_touch_the_global_rng(loaders) -> None:
    model = _dropout_mlp()
    state = torch.random.get_rng_state()
    finetune(model, loaders[1], max_steps=2, seed=1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_finetune_restores_train_eval_modes(loaders) -> None:
    model = _dropout_mlp().eval()
    trained = finetune(model, loaders[1], max_steps=1, progress=False)
    assert not any(m.training for m in trained.modules())


def test_history_records_start_every_k_steps_and_epoch_ends(loaders) -> None:
    train, test = loaders
    result = finetune_with_history(MLP(hidden=(16,)), train, epochs=2, lr=3e-3, progress=False,
                                   eval_data=test, eval_every=5)
    assert isinstance(result, FinetuneResult)
    steps = [r.step for r in result.history]
    assert steps == [0, 5, 10, 11, 15, 20, 22]  # 11 batches per epoch
    assert [r.epoch for r in result.history] == [0, 0, 0, 1, 1, 1, 2]
    assert math.isnan(result.history[0].train_loss)
    assert result.history[-1].eval_accuracy > result.history[0].eval_accuracy
    assert all(r.eval_loss is not None for r in result.history)


def test_history_without_eval_data_has_train_losses_only(loaders) -> None:
    result = finetune_with_history(MLP(hidden=(16,)), loaders[0], epochs=1, progress=False)
    assert [r.step for r in result.history] == [0, 11]
    assert result.history[-1].eval_loss is None and result.history[-1].train_loss > 0


def test_max_steps_stops_training(loaders) -> None:
    result = finetune_with_history(MLP(hidden=(16,)), loaders[0], epochs=5, max_steps=3, progress=False)
    assert result.history[-1].step == 3 and result.history[-1].epoch == 1


@pytest.mark.parametrize(("optimizer", "schedule"), [("sgd", "cosine"), ("adamw", "constant")])
def test_other_optimizers_and_schedules_train(loaders, optimizer: str, schedule: str) -> None:
    train, _ = loaders
    model = MLP(hidden=(32,))
    trained = finetune(model, train, epochs=2, lr=0.05 if optimizer == "sgd" else 3e-3, optimizer=optimizer,
                       schedule=schedule, progress=False)
    assert evaluate(trained, train).loss < evaluate(model, train).loss


def test_train_model_is_finetune() -> None:
    assert train_model is finetune


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"epochs": -1}, "epochs"), ({"lr": 0.0}, "lr"), ({"optimizer": "lbfgs"}, "lbfgs"),
     ({"max_steps": 0}, "max_steps"), ({"schedule": "step"}, "schedule")],
)
def test_finetune_rejects_bad_hyperparameters(loaders, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        finetune(MLP(hidden=(4,)), loaders[0], progress=False, **kwargs)


def test_finetune_rejects_empty_and_unlabelled_data() -> None:
    with pytest.raises(DataError, match="no batches"):
        finetune(MLP(hidden=(4,)), [], progress=False)
    with pytest.raises(DataError, match="labelled"):
        finetune(MLP(hidden=(4,)), [torch.randn(4, 64)], progress=False)


def test_finetune_rejects_non_finite_weights(loaders) -> None:
    model = MLP(hidden=(4,))
    with torch.no_grad():
        model.layers[1].bias[0] = math.nan
    with pytest.raises(NonFiniteWeightsError, match=r"layers\.1\.bias"):
        finetune(model, loaders[0], progress=False)


def test_finetune_stops_when_the_loss_is_not_finite(loaders) -> None:
    with pytest.raises(NonFiniteWeightsError, match="step 0"):
        finetune(MLP(hidden=(4,)), loaders[0], loss_fn=lambda out, y: out.sum() * math.inf, progress=False)


# --- evaluate -----------------------------------------------------------------------------------------


def _toy_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, 64, generator=generator)
    y = torch.randint(0, 10, (10,), generator=generator)
    return [(x[:7], y[:7]), (x[7:], y[7:])]  # uneven batches


def test_evaluate_matches_a_manual_computation() -> None:
    model, batches = MLP(hidden=(8,)), _toy_batches()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model(x)
    result = evaluate(model, batches)
    assert isinstance(result, Evaluation) and result.num_samples == 10
    assert result.loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert result.accuracy == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_evaluate_uses_eval_mode_and_restores_train_mode() -> None:
    model = _dropout_mlp().train()
    first, second = evaluate(model, _toy_batches()), evaluate(model, _toy_batches())
    assert first == second
    assert all(m.training for m in model.modules())


def test_evaluate_with_custom_loss() -> None:
    result = evaluate(MLP(hidden=(8,)), _toy_batches(), loss_fn=lambda out, y: out.new_tensor(2.0))
    assert result.loss == pytest.approx(2.0)


def test_evaluate_rejects_unlabelled_and_empty_data() -> None:
    with pytest.raises(DataError, match="labelled"):
        evaluate(MLP(hidden=(8,)), torch.randn(3, 64))
    with pytest.raises(DataError, match="no batches"):
        evaluate(MLP(hidden=(8,)), [])


def test_predict_logits_concatenates_batches() -> None:
    model = MLP(hidden=(8,))
    logits, targets = predict_logits(model, _toy_batches())
    assert logits.shape == (10, 10) and targets.shape == (10,)
    with torch.no_grad():
        assert torch.allclose(logits[7:], model(_toy_batches()[1][0]))


def test_ensemble_of_one_model_is_the_model() -> None:
    model = MLP(hidden=(8,))
    assert ensemble_evaluate([model], _toy_batches()) == evaluate(model, _toy_batches())


def test_ensemble_averages_logits() -> None:
    a, b = MLP(hidden=(8,)), MLP(hidden=(8,))
    batches = _toy_batches()
    x, y = torch.cat([b_[0] for b_ in batches]), torch.cat([b_[1] for b_ in batches])
    with torch.no_grad():
        logits = 0.25 * a(x) + 0.75 * b(x)
    result = ensemble_evaluate([a, b], batches, weights=[0.25, 0.75])
    assert result.loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def test_ensemble_of_probabilities_is_nll_of_mean_probability() -> None:
    a, b = MLP(hidden=(8,)), MLP(hidden=(8,))
    batches = _toy_batches()
    x, y = torch.cat([b_[0] for b_ in batches]), torch.cat([b_[1] for b_ in batches])
    with torch.no_grad():
        probs = (a(x).softmax(1) + b(x).softmax(1)) / 2
    result = ensemble_evaluate([a, b], batches, combine="probs")
    assert result.loss == pytest.approx(float(F.nll_loss(probs.log(), y)), rel=1e-5)


@pytest.mark.parametrize(("models", "kwargs"), [(0, {}), (2, {"weights": [1.0]}), (2, {"combine": "median"})])
def test_ensemble_rejects_bad_members(models: int, kwargs: dict) -> None:
    with pytest.raises(EnsembleError):
        ensemble_evaluate([MLP(hidden=(8,)) for _ in range(models)], _toy_batches(), **kwargs)


def test_ensemble_accepts_different_architectures() -> None:
    result = ensemble_evaluate([MLP(hidden=(8,)), MLP(hidden=(4, 4))], _toy_batches())
    assert result.num_samples == 10
