"""Per-parameter and per-layer weight-space distances between two models of one architecture.

Three metrics, as in the neuron-swap mode-connectivity experiments (Garipov et al. 2018,
"Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs"; Entezari et al. 2021):

* ``raw_l2``        ``||W_b - W_a||``             Euclidean distance, biased toward large layers;
* ``normalized_l2`` ``||W_b - W_a|| / sqrt(n)``   root-mean-square change per entry, comparable across layers;
* ``relative``      ``||W_b - W_a|| / ||W_a||``   proportional change. ``0/0`` is defined as ``0`` (nothing
  moved) and ``x/0`` for ``x > 0`` as ``inf`` (a layer that was all zeros moved).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checks import check_models
from ..errors import ArchitectureMismatchError, DataError

__all__ = ["METRICS", "LayerDistances", "layer_distances", "state_dict_distances"]

#: The three distance metrics, in the order they are stored.
METRICS: tuple[str, ...] = ("raw_l2", "normalized_l2", "relative")

_AGGREGATES = ("parameter", "module")


@dataclass(frozen=True)
class LayerDistances:
    """Distances between two models, one entry per parameter (or per module).

    Attributes:
        names: parameter names (``"features.0.weight"``) or module names (``"features.0"``), shape (L,).
        raw_l2: ``||W_b - W_a||``, float64 array of shape (L,).
        normalized_l2: ``||W_b - W_a|| / sqrt(n)``, shape (L,).
        relative: ``||W_b - W_a|| / ||W_a||`` (0/0 -> 0, x/0 -> inf), shape (L,).
        num_params: number of entries ``n`` behind each distance, int64 array of shape (L,).
    """

    names: tuple[str, ...]
    raw_l2: np.ndarray
    normalized_l2: np.ndarray
    relative: np.ndarray
    num_params: np.ndarray

    def metric(self, name: str) -> np.ndarray:
        """The array of one metric (``"raw_l2"``, ``"normalized_l2"`` or ``"relative"``)."""
        return getattr(self, check_metric(name))

    def most_moved(self, metric: str = "normalized_l2") -> str:
        """The name of the parameter/module with the largest distance under ``metric``."""
        values = self.metric(metric)
        if values.size == 0:
            raise DataError("no distances to rank: the models have no selected parameters")
        return self.names[int(np.nanargmax(values))]

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view: ``{"names": [...], "raw_l2": [...], ..., "num_params": [...]}``."""
        out: dict[str, Any] = {"names": list(self.names)}
        for name in (*METRICS, "num_params"):
            out[name] = getattr(self, name).tolist()
        return out


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is one of :data:`METRICS`, else raise :class:`DataError`."""
    if metric not in METRICS:
        raise DataError(f"unknown distance metric {metric!r}; expected one of {list(METRICS)}")
    return metric


def _group_name(parameter: str) -> str:
    return parameter.rsplit(".", 1)[0] if "." in parameter else parameter


def _select(
    keys: Sequence[str], names: Sequence[str] | None, aggregate: str
) -> list[tuple[str, list[str]]]:
    """Group parameter ``keys`` into ``(name, [keys])`` rows and keep the rows in ``names``."""
    if aggregate not in _AGGREGATES:
        raise DataError(f"unknown aggregate {aggregate!r}; expected one of {list(_AGGREGATES)}")
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key if aggregate == "parameter" else _group_name(key), []).append(key)
    if names is None:
        return list(groups.items())
    if isinstance(names, str):
        names = [names]
    unknown = [name for name in names if name not in groups]
    if unknown:
        kind = "parameter" if aggregate == "parameter" else "module with parameters"
        raise ArchitectureMismatchError(
            f"names: {unknown} is not a {kind} of the models; known: {list(groups)[:20]}"
            + (" ..." if len(groups) > 20 else "")
        )
    return [(name, groups[name]) for name in names]


def state_dict_distances(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    names: Sequence[str] | None = None,
    aggregate: str = "parameter",
) -> LayerDistances:
    """Distances between two dicts of same-shaped tensors (the arithmetic of :func:`layer_distances`).

    Args:
        state_a: reference tensors (``W_a``), e.g. ``dict(model_a.named_parameters())``.
        state_b: compared tensors (``W_b``) with the same keys and shapes.
        names: keep only these parameters (or modules, with ``aggregate="module"``), in this order.
        aggregate: ``"parameter"`` for one row per tensor, ``"module"`` to pool the tensors of a
            module (``conv.weight`` and ``conv.bias`` -> ``conv``): ``||.||`` is then taken over all
            of the module's entries together and ``n`` is their total count.

    Returns:
        :class:`LayerDistances` with one row per selected parameter or module.
    """
    missing = [key for key in state_a if key not in state_b]
    if missing:
        raise ArchitectureMismatchError(f"state_b lacks the tensor(s) {missing[:5]}, which state_a has")
    for key, a in state_a.items():
        if a.shape != state_b[key].shape:
            raise ArchitectureMismatchError(
                f"{key!r} has shape {tuple(a.shape)} in state_a but {tuple(state_b[key].shape)} in state_b"
            )
    rows = _select(list(state_a), names, aggregate)
    diff_sq = np.zeros(len(rows))
    ref_sq = np.zeros(len(rows))
    counts = np.zeros(len(rows), dtype=np.int64)
    with torch.no_grad():
        for i, (_, keys) in enumerate(rows):
            for key in keys:
                a = state_a[key].detach().to(torch.float64)
                b = state_b[key].detach().to(device=a.device, dtype=torch.float64)
                diff_sq[i] += float(torch.sum((b - a) ** 2))
                ref_sq[i] += float(torch.sum(a**2))
                counts[i] += a.numel()
    raw = np.sqrt(diff_sq)
    normalized = np.divide(raw, np.sqrt(counts), out=np.zeros_like(raw), where=counts > 0)
    ref = np.sqrt(ref_sq)
    relative = np.where(raw == 0, 0.0, np.inf)
    np.divide(raw, ref, out=relative, where=ref > 0)
    return LayerDistances(
        names=tuple(name for name, _ in rows),
        raw_l2=raw,
        normalized_l2=normalized,
        relative=relative,
        num_params=counts,
    )


def layer_distances(
    model_a: nn.Module,
    model_b: nn.Module,
    names: Sequence[str] | None = None,
    aggregate: str = "parameter",
    include_buffers: bool = False,
) -> LayerDistances:
    """Per-parameter (or per-module) distances of ``model_b``'s weights from ``model_a``'s.

    Args:
        model_a: the reference model (``W_a``; the denominator of ``relative``).
        model_b: a model of the same architecture (checked with :func:`fusion.checks.check_models`).
        names: keep only these parameter (or module) names, in this order; default all.
        aggregate: ``"parameter"`` (default) or ``"module"`` to pool each module's tensors.
        include_buffers: also compare floating-point buffers (e.g. BN running statistics).

    Returns:
        :class:`LayerDistances`; arrays have shape (L,) for L selected rows.

    Raises:
        ArchitectureMismatchError: if the models differ, or a name in ``names`` is unknown.

    Example:
        >>> d = layer_distances(model_a, model_b, aggregate="module")  # doctest: +SKIP
        >>> d.most_moved("relative")  # doctest: +SKIP
    """
    check_models([model_a, model_b], names=["model_a", "model_b"], min_count=2, finite=False)
    return state_dict_distances(
        _tensors(model_a, include_buffers), _tensors(model_b, include_buffers), names=names, aggregate=aggregate
    )


def _tensors(model: nn.Module, include_buffers: bool) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    if include_buffers:
        tensors.update((k, v) for k, v in model.named_buffers() if v.is_floating_point())
    return tensors
