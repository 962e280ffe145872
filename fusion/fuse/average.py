"""Weighted parameter averaging and linear interpolation of models of one architecture.

Vanilla averaging (the baseline every fusion paper compares against, e.g. Singh & Jaggi 2020,
Neuron Transplantation) and the interpolation path ``(1 - alpha) * A + alpha * B`` used by the
interpolation-barrier analyses (Frankle et al. 2020; Entezari et al. 2022; Ainsworth et al. 2023).
Floating-point parameters and buffers are combined; integer buffers (BatchNorm's
``num_batches_tracked``) are taken from the first model. Inputs are never modified.

Example:
    >>> merged = average([model_a, model_b])            # uniform
    >>> midpoint = interpolate(model_a, model_b, 0.5)   # the same model
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..checks import check_models, check_weights
from ..errors import ArchitectureMismatchError, EnsembleError

__all__ = ["average", "average_state_dicts", "interpolate"]

#: Tolerance on ``sum(weights) == 1``.
def _combine(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_k weights[k] * tensors[k]``, accumulated in at least float32, in the first tensor's dtype."""
    first = tensors[0]
    accumulate = torch.promote_types(first.dtype, torch.float32)
    total = torch.zeros(first.shape, dtype=accumulate, device=first.device)
    for w, tensor in zip(weights, tensors):
        total.add_(tensor.to(accumulate), alpha=w)
    return total.to(first.dtype)


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    allow_negative: bool = False,
) -> dict[str, torch.Tensor]:
    """Weighted sum of state dicts with identical keys and shapes: the core of every averaging step.

    Args:
        state_dicts: N mappings from name to tensor, in the same key order, shapes equal per key.
        weights: N weights summing to 1 (default uniform).
        allow_negative: accept negative weights (for extrapolation).

    Returns:
        A new state dict: floating tensors are ``sum_k weights[k] * state_dicts[k][key]`` (same
        dtype and device); integer and boolean tensors are copied from ``state_dicts[0]``.

    Raises:
        EnsembleError: no state dicts or bad weights.
        ArchitectureMismatchError: a key missing or a shape differing (names the key).
    """
    state_dicts = list(state_dicts)
    weights = check_weights(weights, len(state_dicts), allow_negative)
    reference = state_dicts[0]
    for k, other in enumerate(state_dicts[1:], start=1):
        if set(other) != set(reference):
            extra = sorted(set(other) ^ set(reference))
            raise ArchitectureMismatchError(f"state_dicts[{k}] and state_dicts[0] differ in the keys {extra[:5]}")
        for key, tensor in reference.items():
            if other[key].shape != tensor.shape:
                raise ArchitectureMismatchError(
                    f"{key!r} has shape {tuple(tensor.shape)} in state_dicts[0] but {tuple(other[key].shape)} "
                    f"in state_dicts[{k}]"
                )
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in reference.items():
        if tensor.is_floating_point() or tensor.is_complex():
            merged[key] = _combine([sd[key] for sd in state_dicts], weights)
        else:
            merged[key] = tensor.clone()
    return merged


def _merge_models(
    models: Sequence[nn.Module],
    weights: Sequence[float] | None,
    allow_negative: bool,
    names: Sequence[str] | None = None,
) -> nn.Module:
    check_models(models, names=names, min_count=1)
    models = list(models)
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(average_state_dicts([m.state_dict() for m in models], weights, allow_negative))
    return merged


def average(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """Vanilla parameter averaging: a new model whose weights are the weighted mean of ``models``.

    Args:
        models: N >= 1 models of one architecture on one device (a single model gives a copy).
        weights: N non-negative weights summing to 1 (default uniform ``1/N``).

    Returns:
        A deep copy of ``models[0]`` (same class, mode and device) holding the averaged weights.

    Raises:
        EnsembleError: empty list or bad weights.
        ArchitectureMismatchError: the models differ in a parameter name or shape (named).
        DeviceMismatchError: the models live on different devices or dtypes.
        NonFiniteWeightsError: a model holds NaN/inf.
    """
    return _merge_models(models, weights, allow_negative=False)


def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """The model ``(1 - alpha) * model_a + alpha * model_b`` (any finite alpha; outside [0, 1] extrapolates).

    Args:
        model_a: the model at ``alpha = 0``.
        model_b: the model at ``alpha = 1`` (same architecture, device and dtype).
        alpha: interpolation coefficient.

    Returns:
        A new model (a copy of ``model_a`` with the interpolated weights).

    Raises:
        EnsembleError: ``alpha`` not finite.
        ArchitectureMismatchError, DeviceMismatchError, NonFiniteWeightsError: as for :func:`average`.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise EnsembleError(f"alpha must be finite, got {alpha}")
    return _merge_models([model_a, model_b], [1.0 - alpha, alpha], allow_negative=True, names=["model_a", "model_b"])
