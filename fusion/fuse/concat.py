"""Concatenate ensemble members into one wide model that computes the mean of their outputs.

First step of Neuron Transplantation (Öz et al., "Model Fusion via Neuron Transplantation",
ECML PKDD 2024): the ``N`` members of an ensemble become one model ``N`` times as wide. Every
permutation group of the members (see :func:`fusion.permutation_spec`) becomes the concatenation of
their groups, each member's block is written block-diagonally (member ``k``'s units only read
member ``k``'s units), the input layer is shared and the output layer sums the members'
contributions scaled by their weight, so ``wide(x) == mean_k f_k(x)``.

The construction is generic, driven by the spec rather than by walking layers:

1. a wide skeleton is a copy of member 0 whose grouped tensor axes are ``N`` times as long, with
   module attributes updated (``in_features``, ``groups`` x N for grouped/depthwise convolutions,
   ``num_groups`` x N for GroupNorm, ``embed_dim``/``num_heads`` x N for attention, class tokens and
   positional embeddings widened on their channel axis);
2. the skeleton is traced with :func:`fusion.permutation_spec`; its groups are matched to the
   members' groups (same kind, producers, consumers and tensors), which tells where unit ``u`` of
   member ``k`` lives in the wide model: unit ``k * size + u`` of the wide group, column ``k`` of a
   grouped convolution's lock-step units, or the ``k``-th copy of a per-conv-group/per-head group;
3. every member's tensors are copied to those positions; tensors without grouped axes are
   averaged; LayerNorms over a widened axis become :class:`~fusion.fuse.layers.BlockLayerNorm` (RMSNorms
   and other channel norms a :class:`~fusion.fuse.layers.BlockNorm`).

A tied input/output embedding (GPT-2's ``wte``/``lm_head``) is untied in the wide model: one tensor
cannot hold member blocks and a weighted read-out at once. Whatever else cannot be concatenated exactly
(units outside every permutation group, ...) raises :class:`ConcatError` naming the layer, and the result is checked
on ``example_inputs`` before it is returned.

Example:
    >>> wide = concat_models([model_a, model_b], torch.randn(1, 3, 32, 32))
    >>> torch.allclose(wide(x), (model_a(x) + model_b(x)) / 2, atol=1e-5)

The parts live in their own modules: :mod:`fusion.fuse.concat_skeleton` (widened axes, the wide
skeleton, :func:`probe_forward`), :mod:`fusion.fuse.concat_groups` (matching groups, position tables,
:class:`GroupLink`), :mod:`fusion.fuse.concat_fill` (writing the members, block norms) and
:mod:`fusion.fuse.tied_embeddings` (untying a tied output embedding). This module holds the entry
points and the check of the result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checks import check_models, check_weights, eval_mode, model_device, move_inputs, run_model
from ..errors import ConcatError, EnsembleError
from ..spec import PermutationSpec, permutation_spec, relative_difference
from .concat_fill import _check_shared_tensors, _fill, _scaled_tensors, _use_block_layer_norms
from .concat_groups import BLOCKS as BLOCKS
from .concat_groups import GROUPS as GROUPS
from .concat_groups import UNITS as UNITS
from .concat_groups import GroupLink, _match_groups, block_index, read_block
from .concat_skeleton import _traced_skeleton, _widened_axes
from .concat_skeleton import probe_forward as probe_forward
from .tied_embeddings import _tied_output_aliases, untied

__all__ = ["ConcatError", "Concatenation", "GroupLink", "block_index", "build_concatenation", "check_members",
           "concat_models", "read_block"]

log = logging.getLogger(__name__)

#: Relative output difference above which a concatenation is rejected as wrong (float32 rounding
#: stays near 1e-6; a structural error is of order 1).
VERIFY_TOL = 1e-4


@dataclass(frozen=True, eq=False)
class Concatenation:
    """A wide model and how its permutation groups map to the members'.

    Attributes:
        model: the wide model (its LayerNorms over widened axes are :class:`BlockLayerNorm`).
        member_spec: the members' permutation spec.
        spec: the wide model's spec (traced with plain LayerNorms; same tensors and coupling).
        links: one :class:`GroupLink` per group of ``spec``.
        widened: canonical state-dict key -> axes that were widened ``N`` times.
        num_members: ``N``.
        layer_norms: module name -> member 0's LayerNorm that a BlockLayerNorm replaced.
        positions: ``(canonical key, widened axis)`` -> LongTensor ``(N, L)``: the wide position of
            member ``k``'s position ``i`` on that axis. Member ``k``'s entries of a wide tensor form the
            block :func:`block_index` gives; every entry outside the members' blocks is zero.
    """

    model: nn.Module
    member_spec: PermutationSpec
    spec: PermutationSpec
    links: tuple[GroupLink, ...]
    widened: dict[str, frozenset[int]]
    num_members: int
    layer_norms: dict[str, nn.Module]
    positions: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


def check_members(models: Sequence[nn.Module], caller: str) -> list[nn.Module]:
    """Validate an ensemble: at least two models of one architecture, device and dtype, finite weights.

    Raises:
        EnsembleError: fewer than two models, or a single module instead of a list.
        ArchitectureMismatchError, DeviceMismatchError, NonFiniteWeightsError: as named.
    """
    if isinstance(models, nn.Module):
        raise EnsembleError(f"{caller} expects a list of models, got a single {type(models).__name__}")
    models = list(models)
    if len(models) < 2:
        raise EnsembleError(f"{caller} needs at least two models, got {len(models)}")
    check_models(models, min_count=2)
    return models


def concat_models(
    models: Sequence[nn.Module], example_inputs: Any, spec: PermutationSpec | None = None, verify: bool = True
) -> nn.Module:
    """Concatenate ``N`` models of one architecture into one ``N`` times wider model of their mean.

    Args:
        models: two or more models sharing an architecture, device and dtype (not modified).
        example_inputs: inputs the models accept (tensor, tuple or dict), e.g. a batch of shape
            ``(B, 3, 32, 32)``; used to trace the models and to check the result.
        spec: the members' :class:`~fusion.PermutationSpec` (computed from ``models[0]`` if None).
        verify: check that the wide model's output on ``example_inputs`` equals the mean of the
            members' outputs (relative difference <= 1e-4) and raise :class:`ConcatError` otherwise.

    Returns:
        A model of member 0's class whose grouped axes are ``N`` times as wide (width ``N * w``);
        in eval mode ``wide(x) == mean_k models[k](x)`` up to float rounding.

    Raises:
        EnsembleError: fewer than two models.
        ArchitectureMismatchError, DeviceMismatchError, NonFiniteWeightsError: invalid ensemble.
        ConcatError: the architecture has a construct that cannot be concatenated exactly.
    """
    models = check_members(models, "concat_models")
    return build_concatenation(models, example_inputs, spec=spec, verify=verify).model


def build_concatenation(
    models: Sequence[nn.Module],
    example_inputs: Any,
    spec: PermutationSpec | None = None,
    weights: Sequence[float] | None = None,
    verify: bool = True,
) -> Concatenation:
    """The wide model of already validated ``models`` plus the group correspondence.

    Args:
        models: validated members (see :func:`check_members`).
        example_inputs: as for :func:`concat_models`.
        spec: the members' spec or None.
        weights: output weight of each member (non-negative, summing to 1; default uniform): the
            wide model computes ``sum_k weights[k] * f_k(x)``.
        verify: as for :func:`concat_models`.

    Returns:
        The :class:`Concatenation`.
    """
    models = list(models)
    count = len(models)
    weights = check_weights(weights, count)
    inputs = move_inputs(example_inputs, model_device(models[0]))
    reference = _weighted_output(models, weights, inputs) if verify else None
    if spec is None:
        spec = permutation_spec(models[0], inputs)
    for k, model in enumerate(models):
        spec.check_model(model, f"models[{k}]")
    widened = _widened_axes(models[0], spec)
    untie = _tied_output_aliases(models[0], widened)
    if untie:  # a tied input/output embedding: the wide model gets its own output layer (GPT-2's lm_head)
        log.info("untying %s from the input embedding in the concatenated model", sorted(untie))
        models = [untied(m, untie) for m in models]
        spec = permutation_spec(models[0], inputs)
        widened = _widened_axes(models[0], spec)
    scaled = _scaled_tensors(models[0], widened)
    _check_shared_tensors(models, spec, widened, scaled)

    wide, wide_spec = _traced_skeleton(models[0], spec, widened, count, inputs)
    links, maps = _match_groups(spec, wide_spec, widened, models[0].state_dict(), count)
    _fill(wide, models, maps, widened, scaled, weights)
    layer_norms = _use_block_layer_norms(wide, models[0], maps)
    if reference is not None:
        with torch.no_grad(), eval_mode(wide):
            diff = relative_difference(run_model(wide, inputs), reference)
        if diff > VERIFY_TOL:
            raise ConcatError(
                f"the concatenated {type(wide).__name__} does not reproduce the ensemble mean on example_inputs "
                f"(relative difference {diff:.2e}): either the model transforms its output layer's result "
                f"non-linearly (e.g. a softmax inside forward; the concatenation averages the output layer), or "
                f"a layer outside the permutation spec mixes the members (skipped: {[s.name for s in spec.skipped]})"
            )
        log.debug("concatenation of %d models verified (relative difference %.2e)", count, diff)
    return Concatenation(wide, spec, wide_spec, tuple(links), {k: frozenset(v) for k, v in widened.items()}, count,
                         layer_norms, maps)


# --------------------------------------------------------------------------------------------
# Checking the result against the ensemble
# --------------------------------------------------------------------------------------------


def _weighted_output(models: Sequence[nn.Module], weights: Sequence[float], inputs: Any) -> Any:
    """``sum_k weights[k] * models[k](inputs)`` in eval mode without gradients (nested outputs too)."""
    outputs = []
    for model in models:
        with torch.no_grad(), eval_mode(model):
            outputs.append(run_model(model, inputs))
    return _combine(outputs, weights)


def _combine(outputs: list[Any], weights: Sequence[float]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return sum(w * o for w, o in zip(weights, outputs)) if first.is_floating_point() else first
    if isinstance(first, dict):
        return {key: _combine([o[key] for o in outputs], weights) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_combine([o[i] for o in outputs], weights) for i in range(len(first)))
    return first
