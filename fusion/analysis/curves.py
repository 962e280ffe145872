"""Bézier mode-connecting curves between two models, and their evaluation along the curve.

Garipov et al. (2018), "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs": two
minima are joined by a Bézier curve ``phi(t) = sum_k B_k(t) theta_k`` with Bernstein weights
``B_k(t) = C(n, k) t^k (1 - t)^(n - k)`` over ``num_bends = n + 1`` bends, whose end points
``theta_0`` (model_a) and ``theta_n`` (model_b) are fixed and whose inner control points are
trained to minimise ``E_{t ~ U(0, 1)} L(phi(t))``. Along a trained curve the loss stays low, and
the per-layer distance of ``phi(t)`` from the original model shows which layers the path moves
(the neuron-swap experiments ask whether a swap of two neurons is corrected locally or globally).

Batch-norm running statistics are not parameters of the curve: training uses batch statistics
(train mode), and :func:`evaluate_curve` recomputes them at every evaluated point.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..checks import check_models, iter_batches, model_device, move_inputs, run_model
from ..errors import DataError, NonFiniteWeightsError
from ..evaluate import logits_and_targets
from ..progress import tqdm
from .distances import METRICS, check_metric, layer_distances
from .interpolation import barrier, evaluate_point
from .io import PathLike, json_text, load_npz, save_npz, write_text

__all__ = [
    "BezierCurve",
    "CurveEvaluation",
    "bernstein_weights",
    "evaluate_curve",
    "load_curve_evaluation",
    "train_bezier_curve",
]

logger = logging.getLogger(__name__)

SUMMARY_NAME = "analysis_summary.json"


def _check_t(t: float) -> float:
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise DataError(f"t must lie in [0, 1], got {t}")
    return t


def bernstein_weights(num_bends: int, t: float) -> list[float]:
    """The Bernstein weights ``C(n, k) t^k (1 - t)^(n - k)`` for ``k = 0..n``, ``n = num_bends - 1``.

    They are exactly ``[1, 0, ..., 0]`` at ``t = 0`` and ``[0, ..., 0, 1]`` at ``t = 1``.
    """
    t = _check_t(t)
    n = num_bends - 1
    return [math.comb(n, k) * t**k * (1.0 - t) ** (n - k) for k in range(num_bends)]


def _frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    for parameter in clone.parameters():
        parameter.requires_grad_(False)
    return clone


class BezierCurve(nn.Module):
    """A Bézier curve in weight space between ``model_a`` (t = 0) and ``model_b`` (t = 1).

    The curve keeps frozen copies of both end points (``start``, ``end``) and ``num_bends - 2``
    trainable control points (``controls[i]``, a :class:`~torch.nn.ParameterList` with one tensor
    per parameter of the model, in ``named_parameters`` order). Control points start evenly spaced
    on the straight line (for ``num_bends=3``: at its midpoint), so the untrained curve is the
    linear path. The inputs are copied, never modified.

    Args:
        model_a: the start point (same architecture, device and dtype as ``model_b``).
        model_b: the end point.
        num_bends: number of Bézier bends including both end points (>= 2; 2 is the straight line).

    Example:
        >>> curve = BezierCurve(model_a, model_b, num_bends=3)  # doctest: +SKIP
        >>> mid = curve.point(0.5)  # an ordinary nn.Module  # doctest: +SKIP
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module, num_bends: int = 3) -> None:
        super().__init__()
        check_models([model_a, model_b], names=["model_a", "model_b"], min_count=2)
        if isinstance(num_bends, bool) or not isinstance(num_bends, int) or num_bends < 2:
            raise DataError(f"num_bends must be an int >= 2 (the end points count), got {num_bends!r}")
        self.num_bends = num_bends
        self.start = _frozen_copy(model_a)
        self.end = _frozen_copy(model_b)
        self.parameter_names: tuple[str, ...] = tuple(name for name, _ in self.start.named_parameters())
        starts, ends = self._endpoint_tensors()
        self.controls = nn.ModuleList()
        for k in range(1, num_bends - 1):
            fraction = k / (num_bends - 1)
            self.controls.append(
                nn.ParameterList(
                    nn.Parameter(((1.0 - fraction) * a + fraction * b).detach().clone()) for a, b in zip(starts, ends)
                )
            )

    def _endpoint_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [p for _, p in self.start.named_parameters()], [p for _, p in self.end.named_parameters()]

    def control_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors (all inner control points), for an optimizer."""
        return list(self.controls.parameters())

    def parameters_at(self, t: float) -> dict[str, torch.Tensor]:
        """The model's parameters at ``t``: ``{name: sum_k B_k(t) theta_k[name]}`` (differentiable).

        Exactly the start (end) point's tensors at ``t = 0`` (``t = 1``).
        """
        weights = bernstein_weights(self.num_bends, t)
        starts, ends = self._endpoint_tensors()
        bends = [starts, *[list(c) for c in self.controls], ends]
        if t in (0.0, 1.0):  # exact end points, without 0 * x arithmetic
            chosen = bends[0] if t == 0.0 else bends[-1]
            return {name: tensor.detach().clone() for name, tensor in zip(self.parameter_names, chosen)}
        combined = {}
        for i, name in enumerate(self.parameter_names):
            combined[name] = sum(w * bend[i] for w, bend in zip(weights, bends))
        return combined

    def buffers_at(self, t: float) -> dict[str, torch.Tensor]:
        """Buffers at ``t``: floating buffers interpolated linearly between the end points, others copied.

        These are only placeholders (BN statistics are recomputed by :func:`evaluate_curve`);
        the returned tensors are new, so updating them never touches the end points.
        """
        t = _check_t(t)
        end_buffers = dict(self.end.named_buffers())
        out = {}
        for name, a in self.start.named_buffers():
            b = end_buffers[name]
            if a.is_floating_point() and 0.0 < t < 1.0:
                out[name] = (1.0 - t) * a + t * b
            else:
                out[name] = (b if t == 1.0 else a).detach().clone()
        return out

    def forward(self, inputs: Any, t: float) -> Any:
        """Run the model at ``t`` on ``inputs`` (gradients flow to the control points).

        Uses the curve's current mode: in train mode BatchNorm uses batch statistics.
        """
        tensors = {**self.buffers_at(t), **self.parameters_at(t)}
        return run_model(lambda *args, **kwargs: functional_call(self.start, tensors, args, kwargs), inputs, "data")

    def point(self, t: float) -> nn.Module:
        """A standalone copy of the model at ``t`` (no gradient link to the curve).

        ``point(0)`` and ``point(1)`` equal ``model_a`` and ``model_b`` exactly (parameters and buffers).
        Its parameters have ``requires_grad=False``.
        """
        model = copy.deepcopy(self.start)
        with torch.no_grad():
            state = {**self.buffers_at(t), **self.parameters_at(t)}
            model.load_state_dict({k: v.detach() for k, v in state.items()}, strict=False)
        return model


def train_bezier_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    epochs: int,
    num_bends: int = 3,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    loss_fn: Callable | None = None,
    seed: int = 0,
    progress: bool = True,
) -> BezierCurve:
    """Fit a Bézier curve between two models (Garipov et al. 2018).

    End points stay fixed; the inner control points start on the straight line and are trained
    by SGD: for every batch a ``t ~ U(0, 1)`` is drawn and the loss of the model at ``t`` is
    minimised. BatchNorm layers run in train mode (batch statistics).

    Args:
        model_a: the start point (not modified).
        model_b: the end point (not modified; same architecture, device and dtype).
        data: training batches of ``(inputs, targets)`` (DataLoader or iterable).
        epochs: passes over ``data`` (>= 0).
        num_bends: Bézier bends including end points (3: one control point).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay on the control points.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; default cross-entropy.
        seed: seeds the draws of ``t`` (and any dropout) without touching the caller's RNG state.
        progress: show a tqdm bar over the batches.

    Returns:
        The trained :class:`BezierCurve`, on the models' device, in eval mode.

    Example:
        >>> curve = train_bezier_curve(model_a, model_b, train_loader, epochs=5)  # doctest: +SKIP
        >>> evaluation = evaluate_curve(curve, test_loader, bn_data=train_loader)  # doctest: +SKIP
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise DataError(f"epochs must be an int >= 0, got {epochs!r}")
    if not lr > 0:
        raise DataError(f"lr must be > 0, got {lr!r}")
    curve = BezierCurve(model_a, model_b, num_bends=num_bends)
    controls = curve.control_parameters()
    if not controls:
        logger.info("num_bends=%d has no control points: the curve is the straight line", num_bends)
        return curve.eval()
    loss_fn = nn.functional.cross_entropy if loss_fn is None else loss_fn
    device = model_device(model_a)
    optimizer = torch.optim.SGD(controls, lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = epochs * len(data) if hasattr(data, "__len__") and not isinstance(data, torch.Tensor) else None
    curve.train()
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        tqdm(total=total, desc="bezier curve", disable=not progress, leave=False) as bar,
    ):
        torch.manual_seed(seed)  # seeds the draws of t and any dropout, leaving the caller's RNG as it was
        for epoch in range(epochs):
            running = 0.0
            for step, (inputs, targets) in enumerate(iter_batches(data), start=1):  # noqa: B007 (used after)
                if targets is None:
                    raise DataError("data must yield (inputs, targets) batches to train a curve; got unlabeled batches")
                t = float(torch.rand(()))
                loss = loss_fn(*logits_and_targets(curve(move_inputs(inputs, device), t), move_inputs(targets, device)))
                if not torch.isfinite(loss):
                    raise NonFiniteWeightsError(f"the curve's training loss became {loss.item()} at t={t:.3f}; lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                running += value
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{value:.4f}")
            logger.info("bezier curve epoch %d: mean training loss %.4f", epoch, running / step)
    return curve.eval()


@dataclass(frozen=True)
class CurveEvaluation:
    """Loss, accuracy and per-layer distances from a reference model at points ``t`` along a curve.

    Attributes:
        t: curve positions, shape (T,).
        loss: mean loss at each t, shape (T,).
        accuracy: accuracy at each t, shape (T,).
        names: layer (or parameter) names, length L.
        raw_l2: ``||W_t - W_ref||`` per point and layer, shape (T, L).
        normalized_l2: ``||W_t - W_ref|| / sqrt(n)``, shape (T, L).
        relative: ``||W_t - W_ref|| / ||W_ref||``, shape (T, L).
        num_params: entries per layer, shape (L,).
        barrier: loss barrier along the curve (see :func:`fusion.analysis.barrier`).
        accuracy_barrier: accuracy barrier along the curve.
    """

    t: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    names: tuple[str, ...]
    raw_l2: np.ndarray
    normalized_l2: np.ndarray
    relative: np.ndarray
    num_params: np.ndarray
    barrier: float
    accuracy_barrier: float

    def metric(self, name: str) -> np.ndarray:
        """The (T, L) matrix of one metric (``"raw_l2"``, ``"normalized_l2"`` or ``"relative"``)."""
        return getattr(self, check_metric(name))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays stored in the ``.npz`` file (layer names under ``"layer_names"``)."""
        return {
            "t": self.t,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "layer_names": np.asarray(self.names, dtype=str),
            **{metric: self.metric(metric) for metric in METRICS},
            "num_params": self.num_params,
            "barrier": np.asarray(self.barrier),
            "accuracy_barrier": np.asarray(self.accuracy_barrier),
        }

    def summary(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Human-readable summary: per-layer max/mean distances, barriers, the layer that moved most.

        Args:
            metadata: extra JSON-able information stored under ``"metadata"`` (e.g. the swapped layer).
        """
        layers = []
        for j, name in enumerate(self.names):
            row: dict[str, Any] = {"name": name, "num_params": int(self.num_params[j])}
            for metric in METRICS:
                column = self.metric(metric)[:, j]
                row[metric] = {
                    "max": float(np.max(column)),
                    "mean": float(np.mean(column)),
                    "t_of_max": float(self.t[int(np.argmax(column))]),
                }
            layers.append(row)
        most_moved = {
            metric: self.names[int(np.argmax(self.metric(metric).max(axis=0)))] if self.names else None
            for metric in METRICS
        }
        return {
            "num_points": int(self.t.size),
            "num_layers": len(self.names),
            "loss": {
                "start": float(self.loss[0]),
                "end": float(self.loss[-1]),
                "max": float(np.max(self.loss)),
                "t_of_max": float(self.t[int(np.argmax(self.loss))]),
                "barrier": self.barrier,
            },
            "accuracy": {
                "start": float(self.accuracy[0]),
                "end": float(self.accuracy[-1]),
                "min": float(np.min(self.accuracy)),
                "t_of_min": float(self.t[int(np.argmin(self.accuracy))]),
                "barrier": self.accuracy_barrier,
            },
            "most_moved_layer": most_moved,
            "layers": layers,
            "metadata": metadata or {},
        }

    def save(
        self, path: PathLike, summary_path: PathLike | None = None, metadata: dict[str, Any] | None = None
    ) -> tuple[Path, Path]:
        """Write the arrays to ``path`` (``.npz``) and :meth:`summary` to JSON, both atomically.

        Args:
            path: the ``.npz`` file, e.g. ``analysis/layer_distances_along_curve.npz``.
            summary_path: the JSON file; default ``analysis_summary.json`` next to ``path``.
            metadata: extra information for the summary.

        Returns:
            ``(npz_path, summary_path)``.
        """
        path = Path(path)
        summary_path = path.parent / SUMMARY_NAME if summary_path is None else Path(summary_path)
        text = json_text(self.summary(metadata))  # fails (e.g. on non-JSON metadata) before anything is written
        save_npz(path, self.to_arrays())
        write_text(summary_path, text)
        return path, summary_path

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> CurveEvaluation:
        """Rebuild an evaluation from :meth:`to_arrays` output (checking the shapes)."""
        t = np.asarray(arrays["t"], dtype=np.float64)
        names = tuple(str(n) for n in np.asarray(arrays["layer_names"]).reshape(-1))
        matrices = {m: np.asarray(arrays[m], dtype=np.float64) for m in METRICS}
        for metric, matrix in matrices.items():
            if matrix.shape != (t.size, len(names)):
                raise DataError(
                    f"array {metric!r} has shape {matrix.shape}, expected (num_points, num_layers) = "
                    f"{(t.size, len(names))}"
                )
        loss = np.asarray(arrays["loss"], dtype=np.float64)
        accuracy = np.asarray(arrays["accuracy"], dtype=np.float64)
        num_params = np.asarray(arrays.get("num_params", np.zeros(len(names))), dtype=np.int64)
        return cls(
            t=t,
            loss=loss,
            accuracy=accuracy,
            names=names,
            num_params=num_params,
            barrier=barrier(loss, t),
            accuracy_barrier=barrier(accuracy, t, higher_is_better=True),
            **matrices,
        )


def load_curve_evaluation(path: PathLike) -> CurveEvaluation:
    """Read a :class:`CurveEvaluation` from an ``.npz`` file written by :meth:`CurveEvaluation.save`."""
    return CurveEvaluation.from_arrays(load_npz(path, required=("t", "loss", "accuracy", "layer_names", *METRICS)))


def evaluate_curve(
    curve: BezierCurve,
    data: Any,
    num_points: int = 61,
    bn_data: Any = None,
    reference: nn.Module | None = None,
    loss_fn: Callable | None = None,
    aggregate: str = "module",
    reset_bn: bool = True,
    progress: bool = True,
) -> CurveEvaluation:
    """Evaluate a curve at ``num_points`` evenly spaced ``t`` in [0, 1].

    At each point the model is built with :meth:`BezierCurve.point`, its BatchNorm statistics are
    recomputed on ``bn_data`` (if it has BN and ``reset_bn``), its loss/accuracy are measured on
    ``data``, and the three per-layer distances of its parameters from ``reference`` are taken.

    Args:
        curve: the curve.
        data: evaluation batches of ``(inputs, targets)``.
        num_points: number of points including both end points (>= 2).
        bn_data: batches for BN statistics (default ``data``); use training data.
        reference: the model distances are measured from; default the curve's start (model_a, "the
            original model"). Must have the curve's architecture.
        loss_fn: ``loss_fn(outputs, targets) -> mean loss``; default cross-entropy.
        aggregate: ``"module"`` (one row per layer, default) or ``"parameter"``.
        reset_bn: recompute BN statistics at each point (recommended: curve points have none of their own).
        progress: show a tqdm bar over the points.

    Returns:
        :class:`CurveEvaluation` with (T,) curves and (T, L) distance matrices.
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise DataError(f"num_points must be an int >= 2 (the end points are included), got {num_points!r}")
    reference = curve.start if reference is None else reference
    check_models([curve.start, reference], names=["curve", "reference"], min_count=2, finite=False)
    ts = np.linspace(0.0, 1.0, num_points)
    losses, accuracies, rows = [], [], []
    for t in tqdm(ts, desc="evaluate curve", disable=not progress, leave=False):
        model = curve.point(float(t))
        rows.append(layer_distances(reference, model, aggregate=aggregate))
        loss, accuracy = evaluate_point(model, data, loss_fn, reset_bn, bn_data)
        losses.append(loss)
        accuracies.append(accuracy)
        logger.debug("t=%.3f loss=%.4f accuracy=%.4f", t, loss, accuracy)
    arrays = {
        "t": ts,
        "loss": np.asarray(losses),
        "accuracy": np.asarray(accuracies),
        "layer_names": np.asarray(rows[0].names, dtype=str),
        "num_params": rows[0].num_params,
        **{metric: np.stack([row.metric(metric) for row in rows]) for metric in METRICS},
    }
    return CurveEvaluation.from_arrays(arrays)
