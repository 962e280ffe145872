"""Aligned merging: permute every model into one basis, then average (Git Re-Basin, REPAIR).

``merge`` is :func:`fusion.align.align_many` followed by :func:`fusion.fuse.average.average`, with
optional BatchNorm statistics reset and REPAIR (Jordan et al. 2023) on calibration data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..align import Alignment, align_many
from ..checks import check_models
from ..errors import DataError
from ..spec import PermutationSpec
from .average import average
from .norm import repair as repair_model
from .norm import reset_bn_stats

__all__ = ["MergeResult", "merge", "merge_with_alignments"]


@dataclass(frozen=True, eq=False)
class MergeResult:
    """The merged model and the alignments that produced it."""

    model: nn.Module
    alignments: list[Alignment]


def merge_with_alignments(
    models: Sequence[nn.Module],
    method: str = "weight",
    data: Any = None,
    example_inputs: Any = None,
    reference: str = "first",
    weights: Sequence[float] | None = None,
    reset_bn: bool = False,
    repair: bool = False,
    max_iter: int = 100,
    seed: int = 0,
    progress: bool = True,
    spec: PermutationSpec | None = None,
    **align_kwargs: Any,
) -> MergeResult:
    """Like :func:`merge`, also returning the :class:`~fusion.align.Alignment` of every model."""
    models = list(models)
    check_models(models, min_count=1)
    if (reset_bn or repair) and data is None:
        raise DataError("reset_bn and repair need calibration data (a DataLoader, batches or a tensor)")
    if len(models) == 1:
        return MergeResult(average(models), [])
    alignments = align_many(models, example_inputs, reference=reference, method=method, data=data,
                            max_iter=max_iter, seed=seed, progress=progress, spec=spec, **align_kwargs)
    aligned = [a.model for a in alignments]
    merged = average(aligned, weights)
    if repair:
        merged = repair_model(merged, aligned, data, weights=weights, progress=progress, inplace=True)
    elif reset_bn:
        merged = reset_bn_stats(merged, data, progress=progress, inplace=True)
    return MergeResult(merged, alignments)


def merge(models: Sequence[nn.Module], method: str = "weight", data: Any = None, **kwargs: Any) -> nn.Module:
    """Align every model into one basis, then average their weights.

    Args:
        models: models of one architecture (never modified); one model returns a copy.
        method: alignment method of :func:`fusion.align` (``"weight"``, ``"activation"``, ``"ot"``).
        data: batches for activation matching and for BatchNorm reset / REPAIR.
        **kwargs: the keyword arguments of :func:`merge_with_alignments`: ``example_inputs``
            (or pass ``spec`` or ``data``), ``reference`` (``"first"`` or ``"mean"`` for
            MergeMany), ``weights`` (default uniform), ``reset_bn`` (recompute BatchNorm
            statistics on ``data``), ``repair`` (REPAIR on ``data``), ``max_iter``, ``seed``,
            ``progress``, ``spec`` and alignment options.

    Returns:
        The merged model, of the members' architecture.
    """
    return merge_with_alignments(models, method=method, data=data, **kwargs).model
