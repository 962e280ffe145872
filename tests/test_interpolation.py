"""Specification of fusion.analysis.interpolation: the barrier arithmetic and the linear-path curve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fusion.analysis.interpolation import (
    InterpolationCurve,
    barrier,
    interpolation_curve,
    load_interpolation_curve,
)
from fusion.data import load_digits_data, make_loaders
from fusion.errors import ArchitectureMismatchError, DataError
from fusion.evaluate import evaluate
from fusion.fuse.average import interpolate
from fusion.fuse.finetune import finetune
from fusion.fuse.norm import reset_bn_stats
from fusion.models import MLP

# --- the barrier arithmetic on known curves --------------------------------------------------


def test_barrier_of_a_bump_is_its_height_above_the_chord() -> None:
    assert barrier([1.0, 3.0, 2.0], [0.0, 0.5, 1.0]) == pytest.approx(3.0 - 1.5)


def test_barrier_uses_the_chord_at_each_alpha_not_the_mean_of_end_points() -> None:
    # chord at 0.25 is 0.75 * 0 + 0.25 * 4 = 1, so the excess there is 2 - 1 = 1; at 0.5 it is 2.5 - 2 = 0.5
    assert barrier([0.0, 2.0, 2.5, 4.0], [0.0, 0.25, 0.5, 1.0]) == pytest.approx(1.0)


def test_barrier_of_a_straight_line_is_zero() -> None:
    assert barrier(np.linspace(2.0, 5.0, 11)) == pytest.approx(0.0, abs=1e-12)


def test_barrier_of_a_curve_below_its_chord_is_zero() -> None:
    assert barrier([1.0, 0.2, 0.1, 1.0]) == 0.0


def test_accuracy_barrier_is_the_largest_drop_below_the_chord() -> None:
    # chord at 0.5 is 0.85; the accuracy there is 0.5
    assert barrier([0.9, 0.5, 0.8], [0.0, 0.5, 1.0], higher_is_better=True) == pytest.approx(0.35)


def test_barrier_defaults_to_evenly_spaced_alphas() -> None:
    assert barrier([0.0, 3.0, 0.0, 0.0, 0.0]) == barrier([0.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize(
    ("values", "alphas", "message"),
    [
        ([1.0], None, "at least 2"),
        ([1.0, 2.0, 3.0], [0.0, 1.0], "shape"),
        ([1.0, 2.0, 3.0], [0.0, 0.5, 0.5], "strictly increasing"),
        ([1.0, 2.0], [0.0, math.nan], "strictly increasing"),
    ],
)
def test_barrier_rejects_malformed_curves(values, alphas, message) -> None:
    with pytest.raises(DataError, match=message):
        barrier(values, alphas)


def test_curve_from_values_computes_both_barriers() -> None:
    curve = InterpolationCurve.from_values([0.0, 0.5, 1.0], [1.0, 3.0, 2.0], [0.9, 0.5, 0.8])
    assert curve.barrier == pytest.approx(1.5)
    assert curve.accuracy_barrier == pytest.approx(0.35)


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_curve_save_and_load_round_trip(tmp_path, suffix) -> None:
    curve = InterpolationCurve.from_values([0.0, 0.5, 1.0], [1.0, 3.0, 2.0], [0.9, 0.5, 0.8], reset_bn=True)
    path = tmp_path / f"curve{suffix}"
    curve.save(path)
    loaded = load_interpolation_curve(path)
    np.testing.assert_array_equal(loaded.loss, curve.loss)
    np.testing.assert_array_equal(loaded.alphas, curve.alphas)
    assert loaded.barrier == curve.barrier and loaded.reset_bn is True
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


def test_to_dict_holds_plain_values() -> None:
    curve = InterpolationCurve.from_values([0.0, 1.0], [1.0, 2.0], [0.5, 0.6])
    assert curve.to_dict() == {
        "alphas": [0.0, 1.0],
        "loss": [1.0, 2.0],
        "accuracy": [0.5, 0.6],
        "barrier": 0.0,
        "accuracy_barrier": 0.0,
        "reset_bn": False,
    }


# --- the curve between two trained digits MLPs ------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    train, test = make_loaders(load_digits_data(seed=0, flatten=True), batch_size=64, seed=0)
    return train, test


def trained_mlp(train, seed: int, batch_norm: bool = False) -> nn.Module:
    """A one-hidden-layer MLP (64 -> 32 -> 10) trained for one epoch on digits (shared with test_curves)."""
    torch.manual_seed(seed)
    model = MLP(in_features=64, hidden=(32,), num_classes=10, batch_norm=batch_norm)
    return finetune(model, train, epochs=1, lr=1e-2, seed=seed, progress=False)


@pytest.fixture(scope="module")
def mlps(digits):
    train, _ = digits
    return trained_mlp(train, 1), trained_mlp(train, 2)


@pytest.fixture(scope="module")
def bn_mlps(digits):
    train, _ = digits
    return trained_mlp(train, 1, batch_norm=True), trained_mlp(train, 2, batch_norm=True)


def test_end_points_equal_the_models_own_evaluations(digits, mlps) -> None:
    _, test = digits
    model_a, model_b = mlps
    curve = interpolation_curve(model_a, model_b, test, steps=5, progress=False)
    assert curve.alphas.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    for index, model in ((0, model_a), (-1, model_b)):
        own = evaluate(model, test)
        assert curve.loss[index] == pytest.approx(own.loss, rel=1e-6)
        assert curve.accuracy[index] == pytest.approx(own.accuracy)


def test_interior_points_are_the_interpolated_models(digits, mlps) -> None:
    _, test = digits
    curve = interpolation_curve(*mlps, test, steps=3, progress=False)
    assert curve.loss[1] == pytest.approx(evaluate(interpolate(*mlps, 0.5), test).loss, rel=1e-6)


def test_barrier_of_the_measured_curve_follows_the_definition(digits, mlps) -> None:
    _, test = digits
    curve = interpolation_curve(*mlps, test, steps=5, progress=False)
    chord = (1 - curve.alphas) * curve.loss[0] + curve.alphas * curve.loss[-1]
    assert curve.barrier == pytest.approx(float(np.max(curve.loss - chord)))
    acc_chord = (1 - curve.alphas) * curve.accuracy[0] + curve.alphas * curve.accuracy[-1]
    assert curve.accuracy_barrier == pytest.approx(float(np.max(acc_chord - curve.accuracy)))
    assert curve.barrier > 0.0  # two independently trained nets: the naive midpoint is worse than the chord


def test_reset_bn_recomputes_statistics_at_each_point(digits, bn_mlps) -> None:
    train, test = digits
    model_a, model_b = bn_mlps
    curve = interpolation_curve(model_a, model_b, test, steps=3, reset_bn=True, bn_data=train, progress=False)
    expected = reset_bn_stats(interpolate(model_a, model_b, 0.5), train, progress=False)
    assert curve.loss[1] == pytest.approx(evaluate(expected, test).loss, rel=1e-5)
    assert curve.reset_bn is True


def test_inputs_are_untouched(digits, bn_mlps) -> None:
    _, test = digits
    model_a, model_b = bn_mlps
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model_a, model_b)]
    interpolation_curve(model_a, model_b, test, steps=3, reset_bn=True, progress=False)
    for state, model in zip(before, (model_a, model_b)):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("steps", [1, 0, 2.5, True])
def test_bad_steps_raise(digits, mlps, steps) -> None:
    with pytest.raises(DataError, match="steps"):
        interpolation_curve(*mlps, digits[1], steps=steps, progress=False)


def test_different_architectures_raise(digits, mlps) -> None:
    other = MLP(in_features=64, hidden=(16,), num_classes=10)
    with pytest.raises(ArchitectureMismatchError, match="layers.1.weight"):
        interpolation_curve(mlps[0], other, digits[1], steps=3, progress=False)
