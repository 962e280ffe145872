"""Specification of fusion.tracking: MLflow runs for the CLI and the experiments, against a real local file store."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from fusion.cli import main
from fusion.tracking import Tracker, TrackingError, active_tracker, flatten_results, tracking_run

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``(uri, client)`` of a fresh local file store (the variable recent MLflow needs for file stores is restored after)."""
    mlflow = pytest.importorskip("mlflow", reason="MLflow is optional: pip install 'fusion[mlflow]'")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    return uri, mlflow.MlflowClient(tracking_uri=uri)


def _only_run(client, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return runs[0]


def _artifacts(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


# ------------------------------------------------------------------------------- without MLflow
def test_results_flatten_into_scalars_and_per_step_series() -> None:
    scalars, series = flatten_results(
        {"acc": 0.5, "fused": {"loss": 1.25, "curve": [3, 2, 1]}, "name": "x", "rows": [{"a": 1}], "nan": float("nan")}
    )
    assert scalars == {"acc": 0.5, "fused.loss": 1.25}
    assert series == {"fused.curve": [3.0, 2.0, 1.0]}


def test_tracking_is_a_no_op_without_a_uri(tmp_path: Path) -> None:
    with tracking_run(None, "anything", params={"a": 1}) as tracker:
        assert type(tracker) is Tracker and not tracker.enabled
        assert active_tracker() is tracker
        tracker.log_files([tmp_path / "missing.json"])


def test_missing_mlflow_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(TrackingError, match=r"pip install 'fusion\[mlflow\]'"), tracking_run(f"file:{tmp_path}", "x"):
        pass


# ---------------------------------------------------------------------------------- with MLflow
def test_run_logs_params_series_and_files_to_a_local_store(store, tmp_path: Path) -> None:
    uri, client = store
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"accuracy": 0.75, "losses": [2.0, 1.0, 0.5]}))
    with tracking_run(uri, "unit", params={"lr": 0.1, "path": tmp_path}) as tracker:
        assert active_tracker() is tracker and tracker.enabled
        tracker.log_files([result])
    assert type(active_tracker()) is Tracker
    run = _only_run(client, "unit")
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.1"
    assert run.data.metrics["result.accuracy"] == 0.75
    history = client.get_metric_history(run.info.run_id, "result.losses")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 2.0), (1, 1.0), (2, 0.5)]
    assert _artifacts(client, run.info.run_id) == {"result.json"}


def test_a_failing_block_marks_the_run_failed(store, tmp_path: Path) -> None:
    uri, client = store
    with pytest.raises(KeyError), tracking_run(uri, "failing"):
        raise KeyError("boom")
    assert _only_run(client, "failing").info.status == "FAILED"


def test_cli_command_with_mlflow_logs_its_options_and_result_files(store, tmp_path: Path, capsys) -> None:
    uri, client = store
    code = main(["spec", "--arch", "mlp", "--input-shape", "1,8,8", "--num-classes", "10", "-q",
                 "--output-dir", str(tmp_path / "out"), "--mlflow", "--mlflow-uri", uri])
    assert code == 0, capsys.readouterr().err
    run = _only_run(client, "spec")
    assert run.data.params["arch"] == "mlp" and run.data.params["command"] == "spec"
    assert _artifacts(client, run.info.run_id) == {"spec.json"}
    assert "spec.spec_seconds" in run.data.metrics


def test_experiment_with_mlflow_logs_results_series_and_plots(store, tmp_path: Path) -> None:
    uri, client = store
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        excommon = importlib.import_module("excommon")
    finally:
        sys.path.remove(str(EXPERIMENTS))

    def body(run) -> dict:
        excommon.line_plot(run.out / "curve.png", [{"x": [0, 1, 2], "series": {"loss": [3.0, 2.0, 1.0]}}])
        return {"loss": [3.0, 2.0, 1.0], "best": 1.0}

    parser = excommon.parent_parser("ex99_tracking", "a tracked run")
    excommon.run_experiment(parser, body, ["--output-dir", str(tmp_path / "out"), "--quiet", "--mlflow", "--mlflow-uri", uri],
                            needs_data=False)
    run = _only_run(client, "ex99_tracking")
    assert run.data.params["seed"] == "0"
    assert _artifacts(client, run.info.run_id) == {"curve.png", "results.json"}
    history = client.get_metric_history(run.info.run_id, "results.loss")
    assert sorted(m.step for m in history) == [0, 1, 2]


def test_stitch_finetuning_logs_its_loss_per_epoch(store) -> None:
    import torch
    from torch import nn

    from fusion import fit_stitch, stitch

    uri, client = store
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    with tracking_run(uri, "stitching"):
        fit_stitch(stitch(model, "1", model, "1", data[0][0]), data, progress=False, finetune_epochs=3)
    run = _only_run(client, "stitching")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "stitch_finetune_loss")) == [0, 1, 2]
