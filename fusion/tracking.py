"""Experiment tracking with MLflow (optional): parameters, per-step metrics and result files of a run.

``fusion`` commands and the experiment scripts take ``--mlflow [URI]``; with it, a run is opened in the
MLflow experiment named after the command or script, the options are logged as parameters, every result
file written is logged as an artifact, and the numbers in JSON results become metrics (numeric lists
become per-step series, step = position in the list). Without ``--mlflow`` nothing is imported or logged.

MLflow is an optional dependency (``pip install fusion[mlflow]``, which installs the ``mlflow-skinny``
client; a full ``mlflow`` install works too). The default tracking URI, ``file:./mlruns``, is a local
folder (no server): recent MLflow versions refuse file stores unless ``MLFLOW_ALLOW_FILE_STORE`` is set,
so opening a file store sets it to ``true`` when it is unset. View runs with ``mlflow ui --backend-store-uri
./mlruns``.

Library code logs through :func:`active_tracker`, which is a no-op :class:`Tracker` outside
:func:`tracking_run`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import FusionError

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MlflowTracker",
    "Tracker",
    "TrackingError",
    "active_tracker",
    "add_tracking_options",
    "flatten_results",
    "tracking_run",
]

logger = logging.getLogger(__name__)

#: Where runs go when ``--mlflow`` is given without a URI: a folder next to the working directory.
DEFAULT_TRACKING_URI = "file:./mlruns"
_MAX_PARAM = 6000
_KEY = re.compile(r"[^\w\-. /]")


class TrackingError(FusionError, RuntimeError):
    """Experiment tracking was requested but cannot work (MLflow missing, store unusable)."""


def _key(name: str) -> str:
    """An MLflow-safe key (letters, digits, ``_-. /``)."""
    return _KEY.sub("_", str(name)) or "_"


def flatten_results(results: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float], dict[str, list[float]]]:
    """Split nested results into scalar metrics and per-step series, keyed by dotted paths.

    Numbers (and booleans) are scalars; lists/tuples of numbers are series; nested mappings recurse;
    everything else (strings, lists of records) is skipped. Non-finite values are skipped too.
    """
    scalars: dict[str, float] = {}
    series: dict[str, list[float]] = {}
    for name, value in results.items():
        key = f"{prefix}{_key(name)}"
        if isinstance(value, Mapping):
            inner_scalars, inner_series = flatten_results(value, f"{key}.")
            scalars.update(inner_scalars)
            series.update(inner_series)
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            scalars[key] = float(value)
        elif isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            series[key] = [float(v) for v in value]
    return scalars, series


class Tracker:
    """Does nothing: the tracker in use when tracking is off. :class:`MlflowTracker` logs for real."""

    enabled = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record run settings (values as text)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record metric values, optionally at a step."""

    def log_series(self, series: Mapping[str, Iterable[float]]) -> None:
        """Record per-step metrics: ``{name: [value at step 0, value at step 1, ...]}``."""

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Attach a file to the run."""

    def log_results(self, results: Mapping[str, Any], prefix: str = "") -> None:
        """Log the numbers of a results mapping (see :func:`flatten_results`)."""
        scalars, series = flatten_results(results, prefix)
        self.log_metrics(scalars)
        self.log_series(series)

    def log_files(self, paths: Iterable[str | os.PathLike]) -> None:
        """Attach result files; the numbers in JSON files are also logged as metrics."""
        for path in paths:
            path = Path(path)
            if not path.is_file():
                continue
            self.log_artifact(path)
            if path.suffix == ".json":
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(data, Mapping):
                    self.log_results(data, prefix=f"{_key(path.stem)}.")


class MlflowTracker(Tracker):
    """Logs to one MLflow run through ``mlflow.MlflowClient`` (no global MLflow state is touched).

    Args:
        uri: tracking URI (``file:./mlruns``, ``sqlite:///mlflow.db``, ``http://host:5000``, ...).
        experiment: experiment name (created if missing).
        run_name: the run's name (MLflow picks one when None).
    """

    enabled = True

    def __init__(self, uri: str, experiment: str, run_name: str | None = None) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise TrackingError(
                "--mlflow needs MLflow: pip install 'fusion[mlflow]' (or mlflow-skinny / mlflow)"
            ) from exc
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        except Exception as exc:  # MLflow raises MlflowException and store-specific errors
            raise TrackingError(f"cannot open an MLflow run in {uri!r} (experiment {experiment!r}): {exc}") from exc
        self.uri, self.experiment = uri, experiment
        logger.info("MLflow run %s in %s (experiment %s)", self.run_id, uri, experiment)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(_key(k), str(v)[:_MAX_PARAM]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._log([(k, v, step or 0) for k, v in metrics.items()])

    def log_series(self, series: Mapping[str, Iterable[float]]) -> None:
        self._log([(k, v, s) for k, values in series.items() for s, v in enumerate(values)])

    def _log(self, points: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_key(k), float(v), now, int(s)) for k, v, s in points if math.isfinite(float(v))]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run finished (or ``"FAILED"``)."""
        self.client.set_terminated(self.run_id, status)


def add_tracking_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--mlflow``, ``--mlflow-uri URI`` and ``--mlflow-experiment NAME`` to ``parser``.

    ``--mlflow`` is a plain flag (a URI after it could not be told apart from a positional argument);
    the URI defaults to :data:`DEFAULT_TRACKING_URI` and the experiment to the command or script name.
    """
    group = parser.add_argument_group("tracking (optional: pip install 'fusion[mlflow]')")
    group.add_argument("--mlflow", action="store_true",
                       help="log options, metrics and result files to an MLflow run (see fusion.tracking)")
    group.add_argument("--mlflow-uri", default=DEFAULT_TRACKING_URI, metavar="URI",
                       help="MLflow tracking URI (a local folder by default: no server needed)")
    group.add_argument("--mlflow-experiment", metavar="NAME",
                       help="MLflow experiment name (default: the command or script name)")


_ACTIVE: list[Tracker] = [Tracker()]


def active_tracker() -> Tracker:
    """The tracker of the innermost :func:`tracking_run`, or a no-op :class:`Tracker`."""
    return _ACTIVE[-1]


@contextlib.contextmanager
def tracking_run(
    uri: str | None, experiment: str, params: Mapping[str, Any] | None = None, run_name: str | None = None
) -> Iterator[Tracker]:
    """Open an MLflow run for the block (``uri`` None: tracking off, a no-op tracker).

    Within the block :func:`active_tracker` returns the run's tracker. The run is marked ``FAILED`` if
    the block raises, ``FINISHED`` otherwise.

    Raises:
        TrackingError: MLflow is not installed or the store cannot be opened.
    """
    if uri is None:
        yield active_tracker()
        return
    tracker = MlflowTracker(uri, experiment, run_name)
    if params:
        tracker.log_params({k: v for k, v in params.items() if not callable(v)})
    _ACTIVE.append(tracker)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        _ACTIVE.remove(tracker)
        tracker.finish(status)
