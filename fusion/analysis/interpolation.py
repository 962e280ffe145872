"""Loss and accuracy along the straight line between two models, and the loss barrier on it.

The barrier follows Git Re-Basin (Ainsworth et al. 2023) and Entezari et al. (2021): the largest
excess of the interpolated loss over the straight line between the end points' losses,

    barrier = max_alpha [ L(alpha) - ((1 - alpha) L(0) + alpha L(1)) ],

and for accuracy the largest shortfall below the straight line between the end points' accuracies,

    accuracy_barrier = max_alpha [ ((1 - alpha) A(0) + alpha A(1)) - A(alpha) ].

Both are 0 for a path that is linear (or convex/concave in the favourable direction).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checks import check_models
from ..errors import DataError
from ..evaluate import evaluate
from ..fuse.average import interpolate
from ..fuse.norm import reset_bn_stats
from ..progress import tqdm
from .io import PathLike, load_json, load_npz, save_json, save_npz

__all__ = ["InterpolationCurve", "barrier", "has_batch_norm", "interpolation_curve", "load_interpolation_curve"]

logger = logging.getLogger(__name__)


def _as_curve_arrays(values: Sequence[float] | np.ndarray, alphas: Sequence[float] | np.ndarray | None) -> tuple:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise DataError(f"values must be a 1-D sequence of at least 2 numbers, got shape {values.shape}")
    alphas = np.linspace(0.0, 1.0, values.size) if alphas is None else np.asarray(alphas, dtype=np.float64)
    if alphas.shape != values.shape:
        raise DataError(f"alphas has shape {alphas.shape} but values has shape {values.shape}")
    if not np.all(np.isfinite(alphas)) or not np.all(np.diff(alphas) > 0):
        raise DataError(f"alphas must be finite and strictly increasing, got {alphas.tolist()}")
    return values, alphas


def barrier(
    values: Sequence[float] | np.ndarray,
    alphas: Sequence[float] | np.ndarray | None = None,
    higher_is_better: bool = False,
) -> float:
    """The barrier of a curve: its largest deviation from the chord between its end points.

    ``values[0]`` and ``values[-1]`` are the end points at ``alphas[0]`` and ``alphas[-1]``
    (normally 0 and 1); the chord at ``alpha`` is the linear interpolation between them. For a loss
    (``higher_is_better=False``) the barrier is ``max(values - chord)``; for an accuracy
    (``higher_is_better=True``) it is ``max(chord - values)``. Both are >= 0 since the end points
    lie on the chord. NaN values make the result NaN.

    Args:
        values: the curve, shape (S,), S >= 2.
        alphas: positions of the values, shape (S,), strictly increasing; default ``linspace(0, 1, S)``.
        higher_is_better: whether larger values are better (accuracy) rather than worse (loss).

    Returns:
        The barrier as a float.

    Example:
        >>> barrier([1.0, 3.0, 2.0], [0.0, 0.5, 1.0])  # 3 - (0.5 * 1 + 0.5 * 2)
        1.5
    """
    values, alphas = _as_curve_arrays(values, alphas)
    weight = (alphas - alphas[0]) / (alphas[-1] - alphas[0])
    chord = (1.0 - weight) * values[0] + weight * values[-1]
    excess = chord - values if higher_is_better else values - chord
    return float(np.max(excess))


@dataclass(frozen=True)
class InterpolationCurve:
    """Loss and accuracy of ``(1 - alpha) * model_a + alpha * model_b`` along ``alphas``.

    Attributes:
        alphas: interpolation coefficients, shape (S,), from 0 (model_a) to 1 (model_b).
        loss: mean loss at each alpha, shape (S,).
        accuracy: accuracy in [0, 1] at each alpha, shape (S,) (NaN for unlabeled data).
        barrier: loss barrier (see the module docstring).
        accuracy_barrier: accuracy barrier (see the module docstring).
        reset_bn: whether BN statistics were recomputed at each point.
    """

    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    barrier: float
    accuracy_barrier: float
    reset_bn: bool = False

    @classmethod
    def from_values(
        cls, alphas: Sequence[float], loss: Sequence[float], accuracy: Sequence[float], reset_bn: bool = False
    ) -> InterpolationCurve:
        """Build a curve from measured values, computing both barriers."""
        loss_arr, alphas_arr = _as_curve_arrays(loss, alphas)
        acc_arr, _ = _as_curve_arrays(accuracy, alphas_arr)
        return cls(
            alphas=alphas_arr,
            loss=loss_arr,
            accuracy=acc_arr,
            barrier=barrier(loss_arr, alphas_arr),
            accuracy_barrier=barrier(acc_arr, alphas_arr, higher_is_better=True),
            reset_bn=bool(reset_bn),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view with lists for the arrays."""
        return {
            "alphas": self.alphas.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": self.accuracy.tolist(),
            "barrier": self.barrier,
            "accuracy_barrier": self.accuracy_barrier,
            "reset_bn": self.reset_bn,
        }

    def save(self, path: PathLike) -> None:
        """Write the curve atomically: ``.npz`` arrays if ``path`` ends in ``.npz``, else JSON."""
        if str(path).endswith(".npz"):
            save_npz(path, self.to_dict())
        else:
            save_json(self.to_dict(), path)


def load_interpolation_curve(path: PathLike) -> InterpolationCurve:
    """Read a curve written by :meth:`InterpolationCurve.save` (``.npz`` or JSON)."""
    if str(path).endswith(".npz"):
        data: dict[str, Any] = load_npz(path, required=("alphas", "loss", "accuracy"))
    else:
        data = load_json(path)
        missing = [k for k in ("alphas", "loss", "accuracy") if not isinstance(data, dict) or k not in data]
        if missing:
            raise DataError(f"{str(path)!r} is not an interpolation curve: it lacks {missing}")
    accuracy = np.asarray(data["accuracy"], dtype=np.float64)  # JSON writes NaN as "nan"
    return InterpolationCurve.from_values(data["alphas"], data["loss"], accuracy, bool(data.get("reset_bn", False)))


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has a batch-norm layer that keeps running statistics."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules()
    )


def evaluate_point(
    model: nn.Module,
    data: Any,
    loss_fn: Callable | None,
    reset_bn: bool,
    bn_data: Any,
) -> tuple[float, float]:
    """Loss and accuracy of a freshly built ``model`` (modified in place: BN stats are recomputed if asked)."""
    if reset_bn and has_batch_norm(model):
        model = reset_bn_stats(model, data if bn_data is None else bn_data, progress=False, inplace=True)
    result = evaluate(model, data, loss_fn=loss_fn)
    return float(result.loss), float(result.accuracy)


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    steps: int = 21,
    loss_fn: Callable | None = None,
    reset_bn: bool = False,
    bn_data: Any = None,
    progress: bool = True,
) -> InterpolationCurve:
    """Evaluate the models ``(1 - alpha) * model_a + alpha * model_b`` for ``steps`` evenly spaced alphas.

    Args:
        model_a: the model at alpha = 0.
        model_b: the model at alpha = 1 (same architecture, device and dtype; align it first to
            measure the barrier modulo permutations).
        data: evaluation batches (DataLoader or iterable of ``(x, y)``).
        steps: number of alphas in ``[0, 1]``, including both end points (>= 2).
        loss_fn: ``loss_fn(outputs, targets) -> mean loss``; default cross-entropy (see
            :func:`fusion.evaluate.evaluate`).
        reset_bn: recompute BatchNorm running statistics at every point (REPAIR/"reset BN" of
            Jordan et al. 2023), including the end points. Ignored for models without BN.
        bn_data: batches for recomputing BN statistics (default ``data``); use training data.
        progress: show a tqdm bar over the alphas.

    Returns:
        :class:`InterpolationCurve` with arrays of shape (steps,).

    Example:
        >>> curve = interpolation_curve(model_a, model_b, test_loader, steps=11)  # doctest: +SKIP
        >>> curve.barrier, curve.accuracy_barrier  # doctest: +SKIP
    """
    check_models([model_a, model_b], names=["model_a", "model_b"], min_count=2)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise DataError(f"steps must be an int >= 2 (the end points are included), got {steps!r}")
    alphas = np.linspace(0.0, 1.0, steps)
    losses, accuracies = [], []
    with torch.no_grad():
        for alpha in tqdm(alphas, desc="interpolation", disable=not progress, leave=False):
            point = interpolate(model_a, model_b, float(alpha))
            loss, accuracy = evaluate_point(point, data, loss_fn, reset_bn, bn_data)
            losses.append(loss)
            accuracies.append(accuracy)
            logger.debug("alpha=%.3f loss=%.4f accuracy=%.4f", alpha, loss, accuracy)
    return InterpolationCurve.from_values(alphas, losses, accuracies, reset_bn=reset_bn)
