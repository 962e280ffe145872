"""Specification of fusion.analysis.curves: Bézier mode-connecting curves and their evaluation."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import test_interpolation as shared
import torch
from torch import nn

from fusion.analysis.curves import (
    BezierCurve,
    CurveEvaluation,
    bernstein_weights,
    evaluate_curve,
    load_curve_evaluation,
    train_bezier_curve,
)
from fusion.analysis.distances import METRICS, layer_distances
from fusion.errors import ArchitectureMismatchError, DataError
from fusion.evaluate import evaluate
from fusion.fuse.average import interpolate
from fusion.fuse.norm import reset_bn_stats
from fusion.models import MLP

# The digits loaders and the two trained MLPs (with and without BatchNorm) of test_interpolation.
digits, mlps, bn_mlps = shared.digits, shared.mlps, shared.bn_mlps


def _states(*models: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def _assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(current[key], value), key


# --- the curve itself ------------------------------------------------------------------------


def test_bernstein_weights_are_a_partition_of_unity_and_exact_at_the_ends() -> None:
    assert bernstein_weights(3, 0.0) == [1.0, 0.0, 0.0]
    assert bernstein_weights(3, 1.0) == [0.0, 0.0, 1.0]
    assert bernstein_weights(3, 0.5) == [0.25, 0.5, 0.25]
    assert sum(bernstein_weights(5, 0.3)) == pytest.approx(1.0)


def test_point_at_zero_and_one_are_the_end_points_exactly(bn_mlps) -> None:
    model_a, model_b = bn_mlps
    curve = BezierCurve(model_a, model_b, num_bends=4)
    _assert_same_state(curve.point(0.0), model_a.state_dict())
    _assert_same_state(curve.point(1.0), model_b.state_dict())


def test_untrained_curve_is_the_straight_line(mlps) -> None:
    curve = BezierCurve(*mlps, num_bends=3)
    line = interpolate(*mlps, 0.3).state_dict()
    for key, value in curve.point(0.3).state_dict().items():
        torch.testing.assert_close(value, line[key], rtol=1e-6, atol=1e-6)


def test_control_point_starts_at_the_midpoint(mlps) -> None:
    curve = BezierCurve(*mlps, num_bends=3)
    middle = interpolate(*mlps, 0.5)
    for control, (name, expected) in zip(curve.controls[0], middle.named_parameters()):
        torch.testing.assert_close(control.detach(), expected.detach(), msg=name)


def test_control_points_get_gradients_and_end_points_do_not(mlps, digits) -> None:
    curve = BezierCurve(*mlps, num_bends=3)
    inputs, targets = next(iter(digits[0]))
    nn.functional.cross_entropy(curve(inputs, 0.3), targets).backward()
    grads = [p.grad for p in curve.control_parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in curve.start.parameters())
    assert all(p.grad is None and not p.requires_grad for p in curve.end.parameters())


def test_forward_equals_the_point_model(mlps, digits) -> None:
    curve = BezierCurve(*mlps, num_bends=3).eval()
    inputs, _ = next(iter(digits[1]))
    with torch.no_grad():
        torch.testing.assert_close(curve(inputs, 0.7), curve.point(0.7)(inputs))


def test_two_bends_have_no_control_points(mlps) -> None:
    assert BezierCurve(*mlps, num_bends=2).control_parameters() == []


@pytest.mark.parametrize("num_bends", [1, 0, 3.0])
def test_bad_num_bends_raise(mlps, num_bends) -> None:
    with pytest.raises(DataError, match="num_bends"):
        BezierCurve(*mlps, num_bends=num_bends)


def test_point_outside_the_unit_interval_raises(mlps) -> None:
    with pytest.raises(DataError, match="t must lie"):
        BezierCurve(*mlps).point(1.5)


def test_different_architectures_raise(mlps) -> None:
    with pytest.raises(ArchitectureMismatchError, match="layers.1"):
        BezierCurve(mlps[0], MLP(in_features=64, hidden=(16,), num_classes=10))


# --- training ----------------------------------------------------------------------------------


def test_training_lowers_the_midpoint_loss_below_the_straight_line(mlps, digits) -> None:
    train, test = digits
    curve = train_bezier_curve(*mlps, train, epochs=3, lr=0.05, seed=0, progress=False)
    line_mid = evaluate(interpolate(*mlps, 0.5), test).loss
    curve_mid = evaluate(curve.point(0.5), test).loss
    assert curve_mid < 0.9 * line_mid
    _assert_same_state(curve.point(0.0), mlps[0].state_dict())  # end points stay fixed
    _assert_same_state(curve.point(1.0), mlps[1].state_dict())


def test_training_is_reproducible_with_a_seed(mlps, digits) -> None:
    batches = list(digits[0])  # a fixed order: a shuffling loader's order is its own business
    curves = [train_bezier_curve(*mlps, batches, epochs=1, seed=3, progress=False) for _ in range(2)]
    for p, q in zip(curves[0].control_parameters(), curves[1].control_parameters()):
        assert torch.equal(p, q)


def test_training_leaves_the_inputs_untouched(bn_mlps, digits) -> None:
    before, modes = _states(*bn_mlps), [m.training for m in bn_mlps]
    train_bezier_curve(*bn_mlps, digits[0], epochs=1, progress=False)
    for model, state in zip(bn_mlps, before):
        _assert_same_state(model, state)
    assert [m.training for m in bn_mlps] == modes


def test_training_on_unlabeled_data_raises(mlps) -> None:
    with pytest.raises(DataError, match="targets"):
        train_bezier_curve(*mlps, [torch.randn(8, 64)], epochs=1, progress=False)


@pytest.mark.parametrize(("kwargs", "message"), [({"epochs": -1}, "epochs"), ({"epochs": 1, "lr": 0.0}, "lr")])
def test_bad_training_arguments_raise(mlps, digits, kwargs, message) -> None:
    with pytest.raises(DataError, match=message):
        train_bezier_curve(*mlps, digits[0], progress=False, **kwargs)


# --- evaluation along the curve ---------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluation(mlps, digits) -> CurveEvaluation:
    curve = train_bezier_curve(*mlps, digits[0], epochs=1, progress=False)
    return evaluate_curve(curve, digits[1], num_points=5, progress=False)


def test_evaluation_has_one_row_per_point_and_one_column_per_layer(evaluation) -> None:
    assert evaluation.t.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert evaluation.names == ("layers.1", "layers.3")
    for metric in METRICS:
        assert evaluation.metric(metric).shape == (5, 2)
    assert evaluation.num_params.tolist() == [64 * 32 + 32, 32 * 10 + 10]


def test_distances_start_at_zero_and_end_at_the_distance_between_the_models(evaluation, mlps) -> None:
    end = layer_distances(*mlps, aggregate="module")
    for metric in METRICS:
        assert np.all(evaluation.metric(metric)[0] == 0.0)
        np.testing.assert_allclose(evaluation.metric(metric)[-1], end.metric(metric), rtol=1e-9)


def test_evaluation_end_points_equal_the_models_own_evaluations(evaluation, mlps, digits) -> None:
    for index, model in ((0, mlps[0]), (-1, mlps[1])):
        assert evaluation.loss[index] == pytest.approx(evaluate(model, digits[1]).loss, rel=1e-6)
        assert evaluation.accuracy[index] == pytest.approx(evaluate(model, digits[1]).accuracy)


def test_reference_can_be_another_model(mlps, digits) -> None:
    curve = BezierCurve(*mlps)
    result = evaluate_curve(curve, digits[1], num_points=3, reference=mlps[1], aggregate="parameter", progress=False)
    assert result.names == ("layers.1.weight", "layers.1.bias", "layers.3.weight", "layers.3.bias")
    assert np.all(result.raw_l2[-1] == 0.0)
    assert np.all(result.raw_l2[0] > 0.0)


def test_reference_of_another_architecture_raises(mlps, digits) -> None:
    with pytest.raises(ArchitectureMismatchError):
        evaluate_curve(BezierCurve(*mlps), digits[1], num_points=3, reference=MLP(64, (8,), 10), progress=False)


def test_bn_statistics_are_recomputed_at_each_point(bn_mlps, digits) -> None:
    train, test = digits
    curve = BezierCurve(*bn_mlps)
    result = evaluate_curve(curve, test, num_points=3, bn_data=train, progress=False)
    expected = evaluate(reset_bn_stats(curve.point(0.5), train, progress=False), test)
    assert result.loss[1] == pytest.approx(expected.loss, rel=1e-5)


def test_bad_num_points_raise(mlps, digits) -> None:
    with pytest.raises(DataError, match="num_points"):
        evaluate_curve(BezierCurve(*mlps), digits[1], num_points=1, progress=False)


# --- saving ------------------------------------------------------------------------------------


def test_npz_holds_the_arrays_and_layer_names(evaluation, tmp_path) -> None:
    npz_path, _ = evaluation.save(tmp_path / "layer_distances_along_curve.npz")
    with np.load(npz_path, allow_pickle=False) as arrays:
        assert arrays["t"].shape == (5,)
        assert arrays["normalized_l2"].shape == (5, 2)
        assert arrays["layer_names"].tolist() == ["layers.1", "layers.3"]
        np.testing.assert_array_equal(arrays["relative"], evaluation.relative)
        np.testing.assert_array_equal(arrays["loss"], evaluation.loss)
        np.testing.assert_array_equal(arrays["accuracy"], evaluation.accuracy)


def test_npz_round_trips(evaluation, tmp_path) -> None:
    npz_path, _ = evaluation.save(tmp_path / "curve.npz")
    loaded = load_curve_evaluation(npz_path)
    assert loaded.names == evaluation.names
    np.testing.assert_array_equal(loaded.raw_l2, evaluation.raw_l2)
    assert loaded.barrier == evaluation.barrier


def test_summary_json_names_the_layer_that_moved_most(evaluation, tmp_path) -> None:
    _, summary_path = evaluation.save(tmp_path / "curve.npz", metadata={"swapped_layer": "layers.1"})
    assert summary_path == tmp_path / "analysis_summary.json"
    summary = json.loads(summary_path.read_text())
    top = evaluation.normalized_l2.max(axis=0)
    assert summary["most_moved_layer"]["normalized_l2"] == evaluation.names[int(np.argmax(top))]
    assert summary["layers"][0]["normalized_l2"]["max"] == pytest.approx(top[0])
    assert summary["layers"][1]["relative"]["mean"] == pytest.approx(evaluation.relative[:, 1].mean())
    assert summary["loss"]["barrier"] == pytest.approx(evaluation.barrier)
    assert summary["accuracy"]["barrier"] == pytest.approx(evaluation.accuracy_barrier)
    assert summary["metadata"] == {"swapped_layer": "layers.1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis_summary.json", "curve.npz"]


def test_failed_save_leaves_existing_files_untouched(evaluation, tmp_path) -> None:
    npz_path = tmp_path / "curve.npz"
    npz_path.write_bytes(b"old")
    with pytest.raises(DataError, match="JSON"):
        evaluation.save(npz_path, metadata={"bad": object()})
    assert npz_path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.npz"]


def test_loading_a_file_without_distances_raises(tmp_path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, t=np.zeros(3))
    with pytest.raises(DataError, match="lacks"):
        load_curve_evaluation(path)


def test_evaluation_leaves_the_curve_untouched(mlps, digits) -> None:
    curve = train_bezier_curve(*mlps, digits[0], epochs=1, progress=False)
    before = {k: v.clone() for k, v in curve.state_dict().items()}
    evaluate_curve(curve, digits[1], num_points=3, bn_data=digits[0], progress=False)
    _assert_same_state(curve, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_curve_trains_and_evaluates_on_cuda(bn_mlps, digits) -> None:
    model_a, model_b = (copy.deepcopy(m).to("cuda") for m in bn_mlps)
    curve = train_bezier_curve(model_a, model_b, digits[0], epochs=1, progress=False)
    assert all(p.is_cuda for p in curve.control_parameters())
    result = evaluate_curve(curve, digits[1], num_points=3, bn_data=digits[0], progress=False)
    assert np.all(np.isfinite(result.loss)) and result.raw_l2[0].max() == 0.0
