"""Representation similarity of two models at named layers, streamed over batches in O(width^2) memory.

Three measures, all computed from the same sufficient statistics (means and centered (cross-)scatter
matrices of the two layers' features, accumulated batch by batch with
:class:`~fusion.moments.CrossMoments`), so memory does not grow with the number of samples:

* linear CKA (Kornblith et al., "Similarity of neural network representations revisited", ICML 2019):
  ``||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``, which equals the Gram-matrix (HSIC) form without
  building any n x n matrix; 1 for identical representations and invariant to rotations and isotropic
  scaling (hence to permutations of neurons);
* Procrustes distance (Ding, Denain & Steinhardt, "Grounding representation similarity through
  statistical testing", NeurIPS 2021): ``sqrt(2 - 2 ||Xc^T Yc||_* / (||Xc||_F ||Yc||_F))``, the distance
  between the unit-norm centered representations after the best rotation; 0 for identical ones;
* matched correlation (Li et al., "Convergent learning: do different neural networks learn the same
  representations?", 2015): neurons of the two layers are paired by ``linear_sum_assignment`` on their
  correlation matrix; the result is the mean correlation of the pairs.

Conv feature maps ``(N, C, H, W)`` count every spatial position as a sample (``(N*H*W, C)``) by default;
``flatten="full"`` uses ``(N, C*H*W)`` instead. Activations are captured with
:mod:`fusion.inspect.capture` (torch.fx, or forward hooks for untraceable models).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..checks import check_same_device, eval_mode, iter_batches, move_inputs
from ..errors import DataError, FusionError
from ..inspect.capture import ActivationCapture, features_as_matrix
from ..moments import CrossMoments
from ..progress import tqdm

__all__ = [
    "MEASURES",
    "SimilarityResult",
    "layer_moments",
    "linear_cka",
    "linear_cka_from_features",
    "matched_correlation",
    "matched_correlation_from_features",
    "procrustes_distance",
    "procrustes_distance_from_features",
    "representation_similarity",
]

Layers = str | Sequence[str]


@dataclass(frozen=True)
class SimilarityResult:
    """One similarity measure for pairs of layers.

    Attributes:
        measure: ``"linear_cka"``, ``"procrustes_distance"`` or ``"matched_correlation"``.
        layers: ``(layer of model_a, layer of model_b)`` pairs.
        values: the measure for each pair.
        num_samples: feature rows used per pair (inputs, times spatial positions with ``flatten="spatial"``).
    """

    measure: str
    layers: tuple[tuple[str, str], ...]
    values: tuple[float, ...]
    num_samples: tuple[int, ...]

    def as_dict(self) -> dict[tuple[str, str], float]:
        """``{(layer_a, layer_b): value}``."""
        return dict(zip(self.layers, self.values))

    def __getitem__(self, layer: str | tuple[str, str]) -> float:
        """The value for a pair ``(layer_a, layer_b)`` or for the first pair whose model-A layer is ``layer``."""
        for pair, value in zip(self.layers, self.values):
            if pair == layer or pair[0] == layer:
                return value
        raise KeyError(layer)


def _cka(m: CrossMoments) -> float:
    denominator = torch.linalg.matrix_norm(m.sxx) * torch.linalg.matrix_norm(m.syy)
    if denominator <= 0:
        return math.nan
    return float(torch.linalg.matrix_norm(m.sxy) ** 2 / denominator)


def _procrustes(m: CrossMoments) -> float:
    scale = torch.sqrt(torch.trace(m.sxx) * torch.trace(m.syy))
    if scale <= 0:
        return math.nan
    similarity = torch.linalg.matrix_norm(m.sxy, ord="nuc") / scale
    return math.sqrt(max(0.0, 2.0 - 2.0 * float(similarity)))


def _matched(m: CrossMoments, tol: float = 1e-10) -> float:
    var_x, var_y = torch.diagonal(m.sxx), torch.diagonal(m.syy)
    live_x = var_x > tol * var_x.max().clamp_min(0)
    live_y = var_y > tol * var_y.max().clamp_min(0)
    if not bool(live_x.any()) or not bool(live_y.any()):
        return math.nan
    corr = m.sxy[live_x][:, live_y] / torch.sqrt(torch.outer(var_x[live_x], var_y[live_y]))
    rows, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)
    rows, cols = torch.as_tensor(rows, device=corr.device), torch.as_tensor(cols, device=corr.device)
    return float(corr[rows, cols].mean())


#: Measure name -> function of :class:`CrossMoments`. Constant neurons (zero variance) are left out of
#: the matching of ``matched_correlation``.
MEASURES: dict[str, Callable[[CrossMoments], float]] = {
    "linear_cka": _cka,
    "procrustes_distance": _procrustes,
    "matched_correlation": _matched,
}


def _feature_moments(x: torch.Tensor, y: torch.Tensor, flatten: str, channel_dim: int) -> CrossMoments:
    fa, fb = features_as_matrix(x, flatten, channel_dim), features_as_matrix(y, flatten, channel_dim)
    _check_pair(fa, fb, ("x", "y"), max(fa.shape[1], fb.shape[1]))
    moments = CrossMoments()
    moments.update(fa, fb)
    return moments


def linear_cka_from_features(x: torch.Tensor, y: torch.Tensor, flatten: str = "spatial", channel_dim: int = 1) -> float:
    """Linear CKA of two representations of the same inputs.

    Args:
        x: ``(n, d1)`` features or ``(N, C1, ...)`` maps.
        y: ``(n, d2)`` features or ``(N, C2, ...)`` maps.
        flatten: how maps become rows (see :func:`fusion.inspect.capture.features_as_matrix`).
        channel_dim: channel dimension of maps.

    Returns:
        CKA in [0, 1] (nan if a representation is constant).
    """
    return _cka(_feature_moments(x, y, flatten, channel_dim))


def procrustes_distance_from_features(x: torch.Tensor, y: torch.Tensor, flatten: str = "spatial", channel_dim: int = 1) -> float:
    """Procrustes distance in [0, sqrt(2)] of two representations (arguments as :func:`linear_cka_from_features`)."""
    return _procrustes(_feature_moments(x, y, flatten, channel_dim))


def matched_correlation_from_features(x: torch.Tensor, y: torch.Tensor, flatten: str = "spatial", channel_dim: int = 1) -> float:
    """Mean correlation of optimally paired neurons (arguments as :func:`linear_cka_from_features`)."""
    return _matched(_feature_moments(x, y, flatten, channel_dim))


def layer_moments(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    layers_a: Layers,
    layers_b: Layers | None = None,
    *,
    flatten: str = "spatial",
    channel_dim: int = 1,
    max_batches: int | None = None,
    max_features: int = 8192,
    progress: bool = False,
) -> tuple[list[tuple[str, str]], list[CrossMoments]]:
    """Stream ``data`` through both models (eval mode, no gradients) and accumulate paired-feature moments.

    Args:
        model_a, model_b: the models (on one device; not modified).
        data: DataLoader or iterable of ``(inputs, targets)`` batches (or input tensors), or one tensor.
        layers_a: layer names or regular expressions in ``model_a`` (module or fx node names).
        layers_b: the matching layers of ``model_b``, one per resolved layer of A; default: the same names.
        flatten: ``"spatial"`` (positions are samples) or ``"full"`` (one sample per input).
        channel_dim: channel dimension of conv maps.
        max_batches: use at most this many batches.
        max_features: refuse layers wider than this (memory is O(width^2) float64 per pair).
        progress: show a tqdm progress bar.

    Returns:
        ``(layer pairs, one CrossMoments per pair)``.

    Raises:
        FusionError: unknown layers, or layer lists of different lengths.
        DataError: empty data, unequal sample counts, layers wider than ``max_features``.
    """
    device = check_same_device([model_a, model_b], ["model_a", "model_b"])
    capture_a = ActivationCapture(model_a, layers_a, argument="layers_a")
    capture_b = ActivationCapture(model_b, capture_a.names if layers_b is None else layers_b, argument="layers_b")
    if len(capture_a.names) != len(capture_b.names):
        raise FusionError(
            f"layers_a resolves to {len(capture_a.names)} layer(s) ({', '.join(capture_a.names)}) but layers_b to "
            f"{len(capture_b.names)} ({', '.join(capture_b.names)}); give one model-B layer per model-A layer"
        )
    pairs = list(zip(capture_a.names, capture_b.names))
    moments = [CrossMoments() for _ in pairs]
    batches = tqdm(iter_batches(data), desc="similarity", disable=not progress, leave=False)
    with torch.no_grad(), eval_mode(model_a), eval_mode(model_b):
        for k, (inputs, _) in enumerate(batches):
            if max_batches is not None and k >= max_batches:
                break
            inputs = move_inputs(inputs, device)
            acts_a, acts_b = capture_a(inputs, "data"), capture_b(inputs, "data")
            for (name_a, name_b), m in zip(pairs, moments):
                fa = features_as_matrix(acts_a[name_a], flatten, channel_dim)
                fb = features_as_matrix(acts_b[name_b], flatten, channel_dim)
                _check_pair(fa, fb, (name_a, name_b), max_features)
                m.update(fa, fb)
    return pairs, moments


def _check_pair(fa: torch.Tensor, fb: torch.Tensor, pair: tuple[str, str], max_features: int) -> None:
    if fa.shape[0] != fb.shape[0]:
        raise DataError(
            f"layers {pair[0]!r} and {pair[1]!r} give {fa.shape[0]} and {fb.shape[0]} samples per batch; with "
            "different spatial sizes use flatten='full'"
        )
    if max(fa.shape[1], fb.shape[1]) > max_features:
        raise DataError(
            f"layers {pair[0]!r} / {pair[1]!r} have {fa.shape[1]} / {fb.shape[1]} features, above max_features="
            f"{max_features} (memory grows with width^2); use flatten='spatial' or raise max_features"
        )


def representation_similarity(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    layers_a: Layers,
    layers_b: Layers | None = None,
    measures: Sequence[str] = tuple(MEASURES),
    **kwargs: Any,
) -> dict[str, SimilarityResult]:
    """Several measures from a single pass over ``data`` (arguments as :func:`layer_moments`).

    Returns:
        Measure name -> :class:`SimilarityResult`.
    """
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise FusionError(f"unknown similarity measure(s) {unknown}; choose from {', '.join(MEASURES)}")
    pairs, moments = layer_moments(model_a, model_b, data, layers_a, layers_b, **kwargs)
    counts = tuple(m.count for m in moments)
    return {
        name: SimilarityResult(name, tuple(pairs), tuple(MEASURES[name](m) for m in moments), counts)
        for name in measures
    }


def linear_cka(
    model_a: nn.Module, model_b: nn.Module, data: Any, layers_a: Layers, layers_b: Layers | None = None, **kwargs: Any
) -> SimilarityResult:
    """Linear CKA between ``model_a``'s and ``model_b``'s representations at paired layers.

    Args:
        model_a, model_b: the models (may be the same object).
        data: batches to compare the representations on.
        layers_a: layer names or regular expressions in ``model_a``.
        layers_b: matching layers in ``model_b`` (default: the same names).
        **kwargs: ``flatten``, ``channel_dim``, ``max_batches``, ``max_features``, ``progress``
            (see :func:`layer_moments`).

    Returns:
        A :class:`SimilarityResult` with one CKA value in [0, 1] per layer pair.
    """
    return representation_similarity(model_a, model_b, data, layers_a, layers_b, ("linear_cka",), **kwargs)["linear_cka"]


def procrustes_distance(
    model_a: nn.Module, model_b: nn.Module, data: Any, layers_a: Layers, layers_b: Layers | None = None, **kwargs: Any
) -> SimilarityResult:
    """Procrustes distance (0 = same up to rotation and scale) at paired layers (arguments as :func:`linear_cka`)."""
    return representation_similarity(model_a, model_b, data, layers_a, layers_b, ("procrustes_distance",), **kwargs)[
        "procrustes_distance"
    ]


def matched_correlation(
    model_a: nn.Module, model_b: nn.Module, data: Any, layers_a: Layers, layers_b: Layers | None = None, **kwargs: Any
) -> SimilarityResult:
    """Mean correlation of neurons paired by linear_sum_assignment, per layer pair (arguments as :func:`linear_cka`)."""
    return representation_similarity(model_a, model_b, data, layers_a, layers_b, ("matched_correlation",), **kwargs)[
        "matched_correlation"
    ]
