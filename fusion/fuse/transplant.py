"""Neuron Transplantation: fuse an ensemble by concatenating its members and pruning the result.

Öz, Debus, Götz (KIT), "Model Fusion via Neuron Transplantation", ECML PKDD 2024. The ``N``
members are concatenated into one ``N`` times wider model computing the ensemble mean
(:func:`~fusion.fuse.concat.concat_models`), then every hidden group is pruned back to the members'
width by keeping its largest units (torch-pruning's group magnitude importance): the small units of
one member are sacrificed to make room for the large units of the others. A short fine-tuning
recovers most of the damage done by the pruning, and the fused model has exactly the members'
architecture.

Pruning is done by torch-pruning (``DependencyGraph.get_pruning_group(...).prune()``) for plain
channel groups. Where torch-pruning would not restore the members' architecture it is done through
the permutation spec instead, by keeping whole structures:

* attention heads: torch-pruning's MultiheadAttention pruner removes embedding channels inside
  every head (``head_dim`` would shrink); whole heads are kept instead, and the embedding stream
  around the attention is pruned through the spec as well;
* grouped convolutions and GroupNorm: torch-pruning keeps all ``N * g`` groups and thins each one;
  whole conv/norm groups are kept instead (``g`` of ``N * g``), so that ``groups`` returns to ``g``;
* parameters outside modules (class tokens, positional embeddings), whose owners keep width
  attributes torch-pruning does not update.

Schedules: ``"all"`` concatenates all members at once (the paper's default), ``"iterative"`` fuses two
at a time from left to right, ``"hierarchical"`` fuses pairs in a binary tree. Members that are exact
copies of each other are merged before concatenating (their units are duplicates), so fusing a model
with itself returns that model.

Example:
    >>> fused = fuse_ensemble([model_a, model_b], example_inputs, finetune_data=train_loader, finetune_epochs=1)

This module holds the entry points and the schedules; ranking units is in
:mod:`fusion.fuse.transplant_importance`, pruning back in :mod:`fusion.fuse.transplant_prune`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import model_device, move_inputs
from ..errors import DataError, EnsembleError
from ..spec import PermutationSpec, permutation_spec
from .concat import build_concatenation, check_members
from .tied_embeddings import _retie
from .transplant_importance import Importance, _importance, _Scorer
from .transplant_prune import _prune_to_members

__all__ = ["SCHEDULES", "fuse_ensemble", "fuse_hierarchical", "fuse_iterative"]

log = logging.getLogger(__name__)

#: Accepted ``schedule`` values of :func:`fuse_ensemble`.
SCHEDULES = ("all", "iterative", "hierarchical")


def fuse_ensemble(
    models: Sequence[nn.Module],
    example_inputs: Any,
    importance: str | Importance = "l2",
    finetune_data: Any = None,
    finetune_epochs: int = 0,
    lr: float = 1e-3,
    progress: bool = True,
    spec: PermutationSpec | None = None,
    schedule: str = "all",
    keep: float | int | None = None,
    data: Any = None,
) -> nn.Module:
    """Fuse an ensemble into one model of the members' architecture by Neuron Transplantation.

    One-shot (without fine-tuning) the fused model loses accuracy: the pruned units of every member
    are gone. BatchNorm networks suffer most because their running statistics describe the
    members, not the transplanted mixture; pass ``data`` to re-estimate them (on two small CNNs with
    BatchNorm trained on the digits, one-shot accuracy rises from 12-25% to about 50%). Fine-tuning
    (``finetune_epochs``) is the method's second half and recovers the members' accuracy or better.

    Args:
        models: two or more trained models of one architecture, device and dtype (not modified).
        example_inputs: inputs the models accept (tensor, tuple or dict), e.g. a batch ``(B, C, H, W)``;
            used to trace the models.
        importance: ``"l2"`` or ``"l1"`` (torch-pruning's ``GroupMagnitudeImportance(p=2 or 1)``), or a
            callable ``importance(group) -> scores`` that receives the torch-pruning ``Group`` of a
            producing layer's output channels (all of them) and returns one score per channel; the
            largest-scoring units are kept. Attention heads, which have no torch-pruning group, are
            ranked by the L2 norm of their weights (L1 with ``"l1"``).
        finetune_data: labelled batches to fine-tune the fused model on (DataLoader or iterable).
        finetune_epochs: epochs of fine-tuning (0: none).
        lr: fine-tuning learning rate (Adam).
        progress: show progress bars.
        spec: the members' :class:`~fusion.PermutationSpec` (computed from ``models[0]`` if None).
        schedule: ``"all"`` (concatenate every member at once), ``"iterative"`` (fuse two at a time,
            left to right) or ``"hierarchical"`` (fuse pairs in a binary tree); in every case each
            original member weighs ``1/N`` in the concatenated output layer. Fine-tuning runs once, at the end.
        keep: how many units of each hidden layer survive the pruning (the paper's pruning ratio is
            ``1 - keep / N``): None (default) keeps the members' width, so the fused model has their
            architecture; a float is a fraction of the members' width (``0.5``: half as wide, ``1.5``:
            wider, at most ``N``); an int is the width of every hidden layer (``keep=1`` is one unit:
            use ``1.0`` for the members' width). Widths other than the members' need ``schedule="all"``
            and layers torch-pruning prunes (convolutions, linear layers, norms; not attention heads or
            grouped convolutions).
        data: batches (DataLoader or iterable, labels ignored) on which the fused model's BatchNorm
            statistics are re-estimated after transplanting (skipped for models without BatchNorm);
            also the fine-tuning data when ``finetune_data`` is None.

    Returns:
        The fused model: an instance of the members' class whose state dict loads into member 0
        with ``strict=True`` (with ``keep``: of the requested widths), in member 0's train/eval mode.

    Raises:
        EnsembleError: fewer than two models, an unknown ``importance`` or ``schedule``, a bad ``keep``.
        ArchitectureMismatchError, DeviceMismatchError, NonFiniteWeightsError: invalid ensemble.
        ConcatError: the architecture cannot be concatenated or pruned back exactly.
        DataError: ``finetune_epochs > 0`` without ``finetune_data``.
    """
    models = check_members(models, "fuse_ensemble")
    scorer = _importance(importance)
    if schedule not in SCHEDULES:
        raise EnsembleError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise DataError(f"finetune_epochs must be a non-negative integer, got {finetune_epochs!r}")
    finetune_data = data if finetune_data is None else finetune_data
    if finetune_epochs > 0 and finetune_data is None:
        raise DataError(f"finetune_epochs={finetune_epochs} needs finetune_data (or data)")
    _check_keep(keep, len(models), schedule)
    inputs = move_inputs(example_inputs, model_device(models[0]))
    if spec is None:
        spec = permutation_spec(models[0], inputs)

    def step(parts: list[_Part]) -> _Part:
        return _transplant(parts, inputs, spec, scorer, progress, keep)

    fused = _reduce([_Part(m, 1) for m in models], step, schedule).model
    if data is not None:
        from .norm import reset_bn_stats

        fused = reset_bn_stats(fused, data, progress=progress, inplace=True)
    if finetune_epochs > 0:
        from .finetune import finetune

        fused = finetune(fused, finetune_data, epochs=finetune_epochs, lr=lr, progress=progress, inplace=True)
    return fused


def fuse_iterative(models: Sequence[nn.Module], example_inputs: Any, **kwargs: Any) -> nn.Module:
    """:func:`fuse_ensemble` with ``schedule="iterative"``: fuse ``models[0]`` and ``models[1]``, then the
    result with ``models[2]``, and so on (each original member keeps weight ``1/N``)."""
    return fuse_ensemble(models, example_inputs, schedule="iterative", **kwargs)


def fuse_hierarchical(models: Sequence[nn.Module], example_inputs: Any, **kwargs: Any) -> nn.Module:
    """:func:`fuse_ensemble` with ``schedule="hierarchical"``: fuse neighbouring pairs, then pairs of the
    results, up a binary tree (an odd model out moves up a level unchanged)."""
    return fuse_ensemble(models, example_inputs, schedule="hierarchical", **kwargs)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Part:
    """A model standing for ``count`` original members."""

    model: nn.Module
    count: int


def _reduce(parts: list[_Part], step: Callable[[list[_Part]], _Part], schedule: str) -> _Part:
    if schedule == "all":
        return step(parts)
    if schedule == "iterative":
        result = parts[0]
        for part in parts[1:]:
            result = step([result, part])
        return result
    while len(parts) > 1:
        parts = [step(parts[i:i + 2]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def _deduplicate(parts: list[_Part]) -> list[_Part]:
    """Merge parts whose models are bitwise identical (their count adds up)."""
    unique: list[tuple[dict[str, torch.Tensor], _Part]] = []
    for part in parts:
        state = part.model.state_dict()
        for k, (other, kept) in enumerate(unique):
            if all(torch.equal(state[key], other[key]) for key in state):
                unique[k] = (other, _Part(kept.model, kept.count + part.count))
                break
        else:
            unique.append((state, part))
    return [part for _, part in unique]


def _check_keep(keep: float | int | None, count: int, schedule: str) -> None:
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not keep > 0:
        raise EnsembleError(f"keep must be a positive fraction of the members' width (float) or a width (int), "
                            f"got {keep!r}")
    if isinstance(keep, float) and keep > count:
        raise EnsembleError(f"keep={keep} asks for more than the {count} members' units together (at most {count}.0)")
    if schedule != "all":
        raise EnsembleError(f"keep needs schedule='all' (the {schedule!r} schedule fuses intermediate models of "
                            f"the members' width)")


def _transplant(parts: list[_Part], inputs: Any, spec: PermutationSpec, scorer: _Scorer, progress: bool,
                keep: float | int | None = None) -> _Part:
    """One transplantation: concatenate ``parts`` (weighted by their counts) and prune back."""
    total = sum(p.count for p in parts)
    parts = _deduplicate(parts) if keep is None else parts  # with keep, duplicates may fill the extra width
    if len(parts) == 1:
        log.info("all %d models are identical; nothing to transplant", total)
        return _Part(copy.deepcopy(parts[0].model), total)
    concat = build_concatenation([p.model for p in parts], inputs, spec=spec, weights=[p.count / total for p in parts])
    return _Part(_retie(_prune_to_members(concat, inputs, scorer, progress, keep), parts[0].model), total)
