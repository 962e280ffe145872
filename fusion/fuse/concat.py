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
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..checks import check_models, check_weights, eval_mode, model_device, move_inputs, run_model
from ..errors import ConcatError, EnsembleError, FusionError
from ..spec import PermutationGroup, PermutationSpec, permutation_spec, relative_difference
from .layers import BlockLayerNorm, BlockNorm, is_channel_norm, owner_of, resize_tensors, set_submodule

__all__ = ["ConcatError", "Concatenation", "GroupLink", "block_index", "build_concatenation", "check_members",
           "concat_models", "read_block"]

log = logging.getLogger(__name__)

#: Relative output difference above which a concatenation is rejected as wrong (float32 rounding
#: stays near 1e-6; a structural error is of order 1).
VERIFY_TOL = 1e-4

#: Patterns relating a wide group to the members' groups (see :class:`GroupLink`).
UNITS, BLOCKS, GROUPS = "units", "blocks", "groups"


@dataclass(frozen=True, eq=False)
class GroupLink:
    """How one permutation group of the wide model relates to the members' groups.

    Attributes:
        group: the group of the wide model.
        pattern: ``"units"``: the group holds the members' units side by side (``N * size`` units);
            ``"blocks"``: lock-step units of a grouped convolution or GroupNorm, whose ``N * block``
            index columns are the members' conv/norm groups side by side;
            ``"groups"``: the group is one of ``N`` copies of a member group (a conv group's output
            channels, one attention head).
        keep: what a member has: units (``"units"``), index columns (``"blocks"``) or groups of the
            family (``"groups"``).
        family: for ``"groups"``: names of all wide groups of the family, member-major order.
    """

    group: PermutationGroup
    pattern: str
    keep: int
    family: tuple[str, ...] = ()


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
# Which tensors are widened, scaled or shared
# --------------------------------------------------------------------------------------------


def _in_group_axis(model: nn.Module, key: str, axis: int) -> bool:
    """Whether ``(key, axis)`` is the per-group input axis of a grouped convolution (never widened:
    the wide convolution has ``N`` times as many groups instead)."""
    _, module, local = owner_of(model, key)
    return isinstance(module, _ConvNd) and not module.transposed and module.groups > 1 and local == "weight" \
        and axis == 1


def _widened_axes(model: nn.Module, spec: PermutationSpec) -> dict[str, set[int]]:
    widened: dict[str, set[int]] = defaultdict(set)
    for group in spec.groups:
        for member in group.members:
            if not _in_group_axis(model, member.name, member.axis):
                widened[member.name].add(member.axis)
    return dict(widened)


def _wide_shape(shape: torch.Size, axes: set[int], count: int) -> tuple[int, ...]:
    return tuple(n * count if a in axes else n for a, n in enumerate(shape))


def _output_axis(module: nn.Module, local: str) -> int | None:
    """The axis of a layer's weight that indexes its outputs (None for other tensors)."""
    if local != "weight":
        return None
    if isinstance(module, _ConvNd):
        return 1 if module.transposed else 0
    if isinstance(module, nn.Linear):
        return 0
    if isinstance(module, nn.Embedding):
        return 1
    return None


def _canonical(model: nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    return {key: first.setdefault(id(t), key) for key, t in model.state_dict(keep_vars=True).items()}


def _scaled_tensors(model: nn.Module, widened: dict[str, set[int]]) -> set[str]:
    """Canonical keys of weights that read widened units but write units that are not widened (the
    output layer): the members' blocks are placed side by side and scaled by their weight."""
    decisions: dict[str, tuple[bool, str]] = {}
    for key, canonical in _canonical(model).items():
        _, module, local = owner_of(model, key)
        axes = widened.get(canonical, set())
        out = _output_axis(module, local)
        scaled = bool(axes) and out is not None and out not in axes
        if canonical in decisions and decisions[canonical][0] != scaled:
            other = decisions[canonical][1]
            raise ConcatError(
                f"{key!r} and {other!r} are one tied tensor, but one layer writes the members' units with it "
                f"and the other reads them to produce the model's output; a concatenation cannot keep both exact"
            )
        decisions.setdefault(canonical, (scaled, key))
    return {key for key, (scaled, _) in decisions.items() if scaled}


def _tied_output_aliases(model: nn.Module, widened: dict[str, set[int]]) -> set[str]:
    """Keys of an output layer's weight that is tied to a layer writing widened units (a tied input
    embedding): one tensor cannot be both a member block and a weighted read-out."""
    aliases = set()
    for key, canonical in _canonical(model).items():
        _, module, local = owner_of(model, key)
        out = _output_axis(module, local)
        axes = widened.get(canonical, set())
        if key != canonical and axes and out is not None and out not in axes:
            aliases.add(key)
    return aliases


def untied(model: nn.Module, keys: set[str]) -> nn.Module:
    """A copy of ``model`` in which the parameters ``keys`` are no longer shared with another name
    (and a Hugging Face config says ``tie_word_embeddings=False``, so that nothing re-ties them)."""
    model = copy.deepcopy(model)
    for key in keys:
        _, module, local = owner_of(model, key)
        old = module._parameters[local]
        module._parameters[local] = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
    config = getattr(model, "config", None)
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    return model


def _check_shared_tensors(
    models: Sequence[nn.Module], spec: PermutationSpec, widened: dict[str, set[int]], scaled: set[str]
) -> None:
    """Raise unless every tensor that all members would share (no widened axis) is either equal in
    all members or belongs to an output layer, whose bias is then averaged exactly."""
    output_modules = {key.rpartition(".")[0] for key in scaled}
    states = [m.state_dict() for m in models]
    for key, tensor in states[0].items():
        module_name = key.rpartition(".")[0]
        if key in widened or not tensor.is_floating_point() or module_name in output_modules:
            continue
        if all(torch.equal(tensor, s[key]) for s in states[1:]):
            continue
        reasons = [f"{s.name}: {s.reason}" for s in spec.skipped if s.name.split("[")[0] == module_name]
        why = f" (the permutation spec skipped {'; '.join(reasons)})" if reasons else ""
        raise ConcatError(
            f"layer {module_name or type(models[0]).__name__!r}: {key!r} of shape {tuple(tensor.shape)} has no axis in "
            f"a permutation group, so the concatenated model would have to share it between members, and the "
            f"members' values differ{why}"
        )


def _unwrapped(model: nn.Module, spec: PermutationSpec) -> dict[str, int] | None:
    """Parameters outside modules that produce units (class tokens, positional embeddings), with their axis."""
    params = dict(model.named_parameters())
    found = {}
    for group in spec.groups:
        for member in group.members:
            if member.name in params and member.name in group.producers:
                found[member.name] = member.axis
    return found or None


# --------------------------------------------------------------------------------------------
# Matching the wide model's groups to the members'
# --------------------------------------------------------------------------------------------


def _family_key(group: PermutationGroup) -> tuple:
    return (group.kind, tuple(sorted(group.producers)), tuple(sorted(group.consumers)), tuple(sorted(group.axes)))


def _anchor(group: PermutationGroup) -> int:
    first = min(group.members, key=lambda m: (m.name, m.axis))
    return int(first.index.min())


def _families(spec: PermutationSpec) -> dict[tuple, list[PermutationGroup]]:
    families: dict[tuple, list[PermutationGroup]] = defaultdict(list)
    for group in spec.groups:
        families[_family_key(group)].append(group)
    return {key: sorted(groups, key=_anchor) for key, groups in families.items()}


class _PositionMaps:
    """For each widened ``(key, axis)``: LongTensor ``(N, L)``, the wide position of member ``k``'s position."""

    def __init__(self, widened: dict[str, set[int]], shapes: dict[str, torch.Size], count: int):
        self.maps = {(key, a): torch.full((count, shapes[key][a]), -1, dtype=torch.long)
                     for key, axes in widened.items() for a in axes}

    def write(self, key_axis: tuple[str, int], k: int, member: torch.Tensor, wide: torch.Tensor) -> None:
        table = self.maps[key_axis]
        member, wide = member.reshape(-1), wide.reshape(-1)
        current = table[k, member]
        if bool(((current >= 0) & (current != wide)).any()):
            raise ConcatError(f"{key_axis[0]!r} (axis {key_axis[1]}): two permutation groups place member {k}'s "
                              f"units at different positions of the wide model")
        table[k, member] = wide

    def check_complete(self) -> None:
        for (key, axis), table in self.maps.items():
            missing = (table < 0).nonzero()
            if len(missing):
                k, position = (int(v) for v in missing[0])
                raise ConcatError(
                    f"{key!r} (axis {axis}): position {position} of member {k} is in no permutation group, so "
                    f"its unit cannot be given to one member only"
                )
            if not torch.equal(table.flatten().sort().values, torch.arange(table.numel())):
                raise ConcatError(f"{key!r} (axis {axis}): the members' units overlap in the wide model")


def _match_groups(
    spec: PermutationSpec,
    wide_spec: PermutationSpec,
    widened: dict[str, set[int]],
    shapes: dict[str, torch.Tensor],
    count: int,
) -> tuple[list[GroupLink], dict[tuple[str, int], torch.Tensor]]:
    """Link every wide group to member groups and record where each member position goes."""
    positions = _PositionMaps(widened, {k: v.shape for k, v in shapes.items()}, count)
    member_families = _families(spec)
    links = []
    for key, wide_groups in _families(wide_spec).items():
        member_groups = member_families.pop(key, [])
        pattern, keep = _pattern(member_groups, wide_groups, count)
        family = tuple(g.name for g in wide_groups) if pattern == GROUPS else ()
        for i, wide in enumerate(wide_groups):
            links.append(GroupLink(wide, pattern, keep if pattern == GROUPS else keep[i], family))
        for i, member_group in enumerate(member_groups):
            for k in range(count):
                wide = wide_groups[k * len(member_groups) + i] if pattern == GROUPS else wide_groups[i]
                _write_positions(positions, member_group, wide, pattern, k, widened)
    if member_families:
        group = next(iter(member_families.values()))[0]
        raise ConcatError(f"member group {group.name!r} has no counterpart in the concatenated model")
    positions.check_complete()
    order = {g.name: i for i, g in enumerate(wide_spec.groups)}
    links.sort(key=lambda link: order[link.group.name])
    return links, positions.maps


def _pattern(member: list[PermutationGroup], wide: list[PermutationGroup], count: int) -> tuple[str, Any]:
    """Classify a family of wide groups against the members' family (see :class:`GroupLink`)."""
    if not member:
        if wide[0].kind == "heads" and all(g.size % count == 0 for g in wide):  # members with one head
            return UNITS, [g.size // count for g in wide]
        raise ConcatError(f"the concatenated model has a permutation group {wide[0].name!r} that matches no "
                          f"member group")
    if len(wide) == len(member) and all(w.size == count * m.size for w, m in zip(wide, member)):
        return UNITS, [m.size for m in member]
    if len(wide) == len(member) and all(w.size == m.size for w, m in zip(wide, member)):
        blocks = [max(a.block for a in m.members) for m in member]
        return BLOCKS, blocks
    if len(wide) == count * len(member) and all(w.size == member[i % len(member)].size for i, w in enumerate(wide)):
        return GROUPS, len(member)
    raise ConcatError(
        f"cannot match member group {member[0].name!r} (size {member[0].size}) to the concatenated model's "
        f"{[g.name for g in wide]} (sizes {[g.size for g in wide]})"
    )


def _write_positions(
    positions: _PositionMaps,
    member: PermutationGroup,
    wide: PermutationGroup,
    pattern: str,
    k: int,
    widened: dict[str, set[int]],
) -> None:
    wide_members = {(m.name, m.axis): m for m in wide.members}
    for axis_member in member.members:
        key_axis = (axis_member.name, axis_member.axis)
        if axis_member.axis not in widened.get(axis_member.name, ()):
            continue  # a grouped convolution's per-group input axis keeps its length
        other = wide_members.get(key_axis)
        index = axis_member.index
        size, block = index.shape
        if pattern == UNITS:
            target = other.index[k * size:(k + 1) * size] if other is not None else None
        elif pattern == BLOCKS:
            target = other.index[:, k * block:(k + 1) * block] if other is not None else None
        else:
            target = other.index if other is not None else None
        if target is None or target.shape != index.shape:
            found = None if other is None else tuple(other.index.shape)
            raise ConcatError(
                f"{axis_member.name!r} (axis {axis_member.axis}) of group {member.name!r} has no matching layout in "
                f"the concatenated model's group {wide.name!r} (index shape {found})"
            )
        positions.write(key_axis, k, index, target)


# --------------------------------------------------------------------------------------------
# The wide skeleton
# --------------------------------------------------------------------------------------------


def _traced_skeleton(
    model: nn.Module, spec: PermutationSpec, widened: dict[str, set[int]], count: int, inputs: Any
) -> tuple[nn.Module, PermutationSpec]:
    """A copy of ``model`` with widened tensors (uninitialised, on ``model``'s device) and its spec.

    The skeleton is traced on the meta device, so that neither it nor the copy that
    :func:`~fusion.permutation_spec` makes takes memory; models that cannot run on the meta device
    are traced with real (zero) tensors instead.
    """
    device = model_device(model)
    for trace_device in (torch.device("meta"), device):
        wide = _meta_copy(model) if trace_device.type == "meta" else copy.deepcopy(model)
        state = wide.state_dict()
        try:
            resize_tensors(wide, {key: torch.zeros(_wide_shape(state[key].shape, axes, count), dtype=state[key].dtype,
                                                   device=trace_device) for key, axes in widened.items()})
        except ValueError as exc:
            raise ConcatError(f"cannot widen the model: {exc}") from exc
        try:
            probe_forward(wide, move_inputs(inputs, trace_device))
            wide_spec = permutation_spec(wide, inputs, verify=False, unwrapped_parameters=_unwrapped(model, spec))
        except (FusionError, NotImplementedError, RuntimeError) as exc:  # meta tensors hold no data to probe
            if trace_device == device:
                raise
            log.debug("tracing the widened model on the meta device failed (%s); tracing real tensors", exc)
            continue
        if trace_device != device:
            wide.to_empty(device=device)  # every tensor is then written by _fill
        return wide, wide_spec
    raise AssertionError("unreachable")


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the meta device (their data is never copied)."""
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _copy_non_persistent_buffers(wide: nn.Module, model: nn.Module) -> None:
    """Buffers outside the state dict (never widened) are copied from ``model``."""
    keys = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name not in keys and buffer is not None:
            _, module, local = owner_of(wide, name)
            module._buffers[local] = buffer.clone()


# --------------------------------------------------------------------------------------------
# Writing the members into the skeleton
# --------------------------------------------------------------------------------------------


def _fill(
    wide: nn.Module,
    models: Sequence[nn.Module],
    maps: dict[tuple[str, int], torch.Tensor],
    widened: dict[str, set[int]],
    scaled: set[str],
    weights: Sequence[float],
) -> None:
    states = [m.state_dict() for m in models]
    canonical = _canonical(wide)
    with torch.no_grad():
        _copy_non_persistent_buffers(wide, models[0])
        for key, target in wide.state_dict().items():
            if canonical[key] != key:
                continue  # tied: written through its first name
            axes = widened.get(key)
            if not axes:
                if target.is_floating_point():
                    target.copy_(sum(w * s[key] for w, s in zip(weights, states)))
                else:
                    target.copy_(states[0][key])
                continue
            if len(axes) > 1:  # the members' blocks do not cover the tensor: the rest is zero
                target.zero_()
            for k, state in enumerate(states):
                source = state[key] * weights[k] if key in scaled else state[key]
                index = block_index(maps, key, target.dim(), k)
                if all(isinstance(i, slice) for i in index):
                    target[index] = source
                else:  # scattered positions: one broadcast index tensor per axis
                    grids = []
                    for a, i in enumerate(index):
                        view = [1] * target.dim()
                        view[a] = -1
                        positions = torch.arange(target.shape[a])[i] if isinstance(i, slice) else i
                        grids.append(positions.to(target.device).view(view))
                    target[tuple(grids)] = source


def block_index(
    positions: Mapping[tuple[str, int], torch.Tensor], key: str, dim: int, k: int
) -> tuple[slice | torch.Tensor, ...]:
    """Where member ``k``'s entries lie in the wide tensor ``key`` (see :attr:`Concatenation.positions`).

    Args:
        positions: the concatenation's position tables.
        key: canonical state-dict key of the tensor.
        dim: number of axes of the tensor.
        k: member index.

    Returns:
        One entry per axis: a slice (all of an axis that was not widened, or a contiguous run of
        positions) or a LongTensor of positions, ordered like the member's own positions.
    """
    index: list[slice | torch.Tensor] = []
    for axis in range(dim):
        table = positions.get((key, axis))
        if table is None:
            index.append(slice(None))
            continue
        row = table[k]
        start = int(row[0]) if len(row) else 0
        if torch.equal(row, torch.arange(start, start + len(row))):
            index.append(slice(start, start + len(row)))
        else:
            index.append(row)
    return tuple(index)


def read_block(tensor: torch.Tensor, index: Sequence[slice | torch.Tensor]) -> torch.Tensor:
    """The entries of ``tensor`` at ``index`` (from :func:`block_index`): a view where every entry is a slice."""
    for axis, i in enumerate(index):
        if isinstance(i, slice):
            tensor = tensor[(slice(None),) * axis + (i,)]
        else:
            tensor = tensor.index_select(axis, i.to(tensor.device))
    return tensor


def _use_block_layer_norms(
    wide: nn.Module, member: nn.Module, maps: dict[tuple[str, int], torch.Tensor]
) -> dict[str, nn.Module]:
    """Replace every LayerNorm whose axis was widened by a BlockLayerNorm over the members' slices.

    Returns:
        Name -> the member's LayerNorm, for each replaced layer.
    """
    member_modules = dict(member.named_modules())
    replaced = {}
    for name, module in list(wide.named_modules()):
        if isinstance(module, (BlockLayerNorm, BlockNorm)) or not (isinstance(module, nn.LayerNorm)
                                                                   or is_channel_norm(module)):
            continue
        original = member_modules[name]
        if not isinstance(module, nn.LayerNorm):  # RMSNorm and other channel norms: a generic block norm
            if module.weight.shape != original.weight.shape:
                _check_contiguous(maps, name)
                count = module.weight.shape[0] // original.weight.shape[0]
                set_submodule(wide, name, BlockNorm(original, module.weight, getattr(module, "bias", None), count))
                replaced[name] = original
            continue
        if tuple(module.normalized_shape) == tuple(original.normalized_shape):
            continue
        if len(original.normalized_shape) != 1:
            raise ConcatError(f"LayerNorm {name!r} normalises over {tuple(original.normalized_shape)}; only "
                              f"LayerNorms over one axis can be concatenated")
        block = original.normalized_shape[0]
        _check_contiguous(maps, name)
        set_submodule(wide, name, BlockLayerNorm.from_layer_norm(module, block))
        replaced[name] = original
    return replaced


def _check_contiguous(maps: dict[tuple[str, int], torch.Tensor], name: str) -> None:
    table = maps.get((f"{name}.weight", 0))
    if table is not None:
        expected = torch.arange(table.numel()).view(table.shape)
        if not torch.equal(table.sort(dim=1).values, expected):
            raise ConcatError(f"norm {name!r}: the members' features are not contiguous slices of the "
                              f"concatenated axis, so they cannot be normalised separately")


# --------------------------------------------------------------------------------------------
# Running the skeleton
# --------------------------------------------------------------------------------------------


def probe_forward(model: nn.Module, inputs: Any) -> None:
    """Run ``model`` once (eval mode, no grad), fitting norms without parameters to their input width.

    GroupNorm and LayerNorm layers without affine parameters have no tensor that tells their width;
    they are given the channel count they receive (GroupNorm keeps its channels per group).

    Raises:
        ConcatError: the model fails, naming the innermost layer that was running.
    """
    running: list[str] = []
    handles = []

    def before(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            running.append(name)
            if args and isinstance(args[0], torch.Tensor):
                _fit_shapeless_norm(module, args[0], name)

        return hook

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        running.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(before(name)))
        handles.append(module.register_forward_hook(after))
    try:
        with torch.no_grad(), eval_mode(model):
            run_model(model, inputs)
    except Exception as exc:  # the model's own code may raise anything
        layer = running[-1] if running else type(model).__name__
        cause = exc.__cause__ or exc
        raise ConcatError(f"the resized {type(model).__name__} fails in layer {layer!r}: {cause}") from exc
    finally:
        for handle in handles:
            handle.remove()


def _fit_shapeless_norm(module: nn.Module, x: torch.Tensor, name: str) -> None:
    if isinstance(module, nn.GroupNorm) and module.weight is None and x.dim() > 1:
        channels = int(x.shape[1])
        if channels != module.num_channels:
            per_group = module.num_channels // module.num_groups
            if channels % per_group:
                raise ValueError(f"GroupNorm {name}: {channels} channels are not a multiple of {per_group} per group")
            module.num_groups, module.num_channels = channels // per_group, channels
    elif isinstance(module, nn.LayerNorm) and module.weight is None and len(module.normalized_shape) == 1:
        if int(x.shape[-1]) != module.normalized_shape[0]:
            module.normalized_shape = (int(x.shape[-1]),)


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
