"""Apply permutations: function-preserving neuron permutation, swaps and equivalence checks.

A permutation of a group is a LongTensor ``perm`` of length ``group.size`` where ``perm[i]`` is
the unit of the source model that lands at position ``i``. :func:`permute` applies a dict of such
permutations (group name -> perm; absent groups stay in place) to every coupled tensor at once, so
the permuted model computes the same function. Everything here is pure unless ``inplace=True``.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import nn

from .checks import check_same_device, eval_mode, model_device, move_inputs, run_model
from .errors import PermutationError

if TYPE_CHECKING:
    from .spec import AxisMember, PermutationGroup, PermutationSpec

__all__ = [
    "Permutations",
    "check_permutations",
    "compose_permutations",
    "identity_permutation",
    "inverse_permutation",
    "layer_group",
    "permute",
    "permute_axis",
    "axis_order",
    "permute_layer",
    "permute_state_dict",
    "random_permutation",
    "swap_neurons",
    "verify_equivalence",
]

logger = logging.getLogger(__name__)

#: A permutation per group name.
Permutations = dict[str, torch.Tensor]
GroupsLike = Union["PermutationSpec", Iterable["PermutationGroup"]]


def _groups(spec: GroupsLike) -> list[PermutationGroup]:
    return list(spec.groups) if hasattr(spec, "groups") else list(spec)


def random_permutation(spec: GroupsLike, seed: int = 0) -> Permutations:
    """A uniformly random permutation of every group (reproducible through ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    return {g.name: torch.randperm(g.size, generator=generator) for g in _groups(spec)}


def identity_permutation(spec: GroupsLike) -> Permutations:
    """The identity permutation of every group."""
    return {g.name: torch.arange(g.size) for g in _groups(spec)}


def inverse_permutation(perms: Mapping[str, torch.Tensor]) -> Permutations:
    """Per group, the inverse permutation.

    ``permute(permute(m, perms), inverse_permutation(perms))`` restores ``m`` exactly when no two
    groups share positions of one tensor axis, i.e. for every group except the overlapping
    attention-head groups of ``nn.MultiheadAttention`` (whole heads and within-head dims), whose
    composition order matters; align the permuted model back instead there.
    """
    return {name: torch.argsort(torch.as_tensor(p)) for name, p in perms.items()}


def compose_permutations(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> Permutations:
    """The permutations equivalent to applying ``first``, then ``second`` (missing = identity)."""
    out = {name: torch.as_tensor(p).clone() for name, p in first.items()}
    for name, p in second.items():
        p = torch.as_tensor(p)
        out[name] = out[name][p] if name in out else p.clone()
    return out


def check_permutations(spec: GroupsLike, perms: Mapping[str, Any]) -> Permutations:
    """Validate ``perms`` against ``spec`` and return them as CPU LongTensors.

    Raises:
        PermutationError: an unknown group name, or a value that is not a permutation of
            ``range(group.size)`` (wrong length, repeats, out of range, non-integer dtype).
    """
    if not isinstance(perms, Mapping):
        raise PermutationError(f"perms must be a dict of group name -> permutation, got {type(perms).__name__}")
    groups = {g.name: g for g in _groups(spec)}
    checked: Permutations = {}
    for name, perm in perms.items():
        if name not in groups:
            raise PermutationError(f"no permutation group named {name!r}; known groups: {list(groups)[:8]}...")
        size = groups[name].size
        if isinstance(perm, np.ndarray) or isinstance(perm, (list, tuple)):
            perm = torch.as_tensor(np.asarray(perm))
        if not isinstance(perm, torch.Tensor):
            raise PermutationError(f"permutation of {name!r} must be a tensor, got {type(perm).__name__}")
        if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
            raise PermutationError(f"permutation of {name!r} must have an integer dtype, got {perm.dtype}")
        if perm.dim() != 1 or perm.numel() != size:
            raise PermutationError(
                f"permutation of {name!r} must have shape ({size},), got {tuple(perm.shape)}"
            )
        perm = perm.detach().to("cpu", torch.long)
        if size and (int(perm.min()) < 0 or int(perm.max()) >= size):
            raise PermutationError(f"permutation of {name!r} has values outside [0, {size})")
        if torch.unique(perm).numel() != size:
            raise PermutationError(f"permutation of {name!r} repeats an index, so it is not a permutation")
        checked[name] = perm
    return checked


def permute_state_dict(
    state: Mapping[str, torch.Tensor], spec: GroupsLike, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a new state dict with ``perms`` applied to every tensor axis they move.

    The input dict and its tensors are not modified; tensors that no permutation touches are
    shared with the input. ``perms`` must already be valid (see :func:`check_permutations`).
    """
    orders: dict[tuple[str, int], torch.Tensor] = {}  # composed index order per tensor axis
    for group in _groups(spec):
        perm = perms.get(group.name)
        if perm is None:
            continue
        for member in group.members:
            if member.name not in state:  # a partial state dict: only its tensors are permuted
                continue
            order = axis_order(member, perm, state[member.name].shape[member.axis])
            key = (member.name, member.axis)
            orders[key] = orders[key][order] if key in orders else order
    out = dict(state)
    for (name, axis), order in orders.items():
        out[name] = out[name].index_select(axis, order.to(out[name].device))
    return out


def axis_order(member: AxisMember, perm: torch.Tensor, length: int) -> torch.Tensor:
    """The ``index_select`` order along ``member``'s axis (of ``length``) that applies ``perm``."""
    order = torch.arange(length)
    order[member.index.reshape(-1)] = member.index[perm.cpu()].reshape(-1)
    return order


def permute_axis(tensor: torch.Tensor, member: AxisMember, perm: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` with the units of one group member reordered by ``perm`` (a new tensor)."""
    order = axis_order(member, perm, tensor.shape[member.axis])
    return tensor.index_select(member.axis, order.to(tensor.device))


def _write_state(
    model: nn.Module, new_state: Mapping[str, torch.Tensor], old_state: Mapping[str, torch.Tensor]
) -> None:
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():
            if new_state[key] is not old_state[key]:
                tensor.copy_(new_state[key])


def permute(model: nn.Module, perms: Mapping[str, Any], spec: PermutationSpec, inplace: bool = False) -> nn.Module:
    """Permute the hidden units of ``model``; the result computes the same function.

    Args:
        model: a model of the architecture ``spec`` was built for.
        perms: group name -> permutation (``perm[i]`` = source unit landing at ``i``); groups not
            listed stay in place.
        spec: from :func:`~fusion.permutation_spec`.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The permuted model (``model`` itself if ``inplace``). Validation happens before any write,
        so on error nothing is modified.
    """
    spec.check_model(model)
    checked = check_permutations(spec, perms)
    state = model.state_dict()
    new_state = permute_state_dict(state, spec, checked)
    target = model if inplace else copy.deepcopy(model)
    _write_state(target, new_state, state)
    return target


def _spec_for(model: nn.Module, example_inputs: Any, spec: PermutationSpec | None) -> PermutationSpec:
    from .spec import permutation_spec

    if spec is None:
        if example_inputs is None:
            raise PermutationError("pass example_inputs (to trace the model) or a precomputed spec")
        return permutation_spec(model, example_inputs)
    spec.check_model(model)
    return spec


def layer_group(spec: PermutationSpec, layer: str) -> PermutationGroup:
    """The permutation group of module ``layer``'s output units.

    Like :meth:`PermutationSpec.group_of_layer`, and a normalisation layer (BatchNorm, LayerNorm,
    GroupNorm's affine vectors: every tensor of the module a vector of one group's units) resolves
    to the group of the units it normalises (``bn1`` -> the group of ``conv1``).

    Raises:
        PermutationError: ``layer`` does not exist or produces no permutable units.
    """
    try:
        return spec.group_of_layer(layer)
    except PermutationError as error:
        own = [key for key in spec.shapes if key.startswith(layer + ".") and "." not in key[len(layer) + 1:]]
        vectors = [key for key in own if len(spec.shapes[key]) == 1]
        groups = {g.name: g for key in vectors for g, m in spec.members_of(key) if m.axis == 0 and g.kind == "channels"}
        if vectors and len(groups) == 1 and all(len(spec.shapes[key]) <= 1 for key in own) and all(
            spec.members_of(key) for key in vectors
        ):
            group = next(iter(groups.values()))
            logger.debug("layer %r normalises the units of group %r", layer, group.name)
            return group
        raise error


def permute_layer(
    model: nn.Module,
    layer: str,
    order: Any,
    example_inputs: Any = None,
    inplace: bool = False,
    spec: PermutationSpec | None = None,
) -> nn.Module:
    """Reorder the output units of module ``layer`` by ``order``, moving every coupled tensor.

    Works on layers that feed skip connections too (the whole residual stream moves) and on
    normalisation layers (their units are those they normalise, see :func:`layer_group`). ``order``
    is a permutation of the layer's group (``order[i]`` = unit landing at ``i``).

    Raises:
        PermutationError: ``layer`` does not exist or produces no permutable units.
    """
    spec = _spec_for(model, example_inputs, spec)
    group = layer_group(spec, layer)
    return permute(model, {group.name: order}, spec, inplace=inplace)


def unit_index(value: Any, argument: str, layer: str, size: int) -> int:
    """``value`` as a unit index of a layer with ``size`` units: Python/numpy integers and 0-d integer
    tensors or arrays are accepted.

    Raises:
        PermutationError: ``value`` is not an integer scalar (naming its type) or is out of range.
    """
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 0:
            raise PermutationError(f"{argument} must be a single unit index of {layer!r}, got a tensor of shape "
                                   f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        raise PermutationError(f"{argument}={value!r} is a boolean, not a unit index of {layer!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise PermutationError(f"{argument} must be an integer unit index of {layer!r}, got {type(value).__name__} "
                               f"{value!r}") from None
    if not 0 <= index < size:
        raise PermutationError(f"{argument}={index} is out of range for {layer!r}, which has {size} units")
    return index


def swap_neurons(
    model: nn.Module,
    layer: str,
    i: int,
    j: int,
    example_inputs: Any = None,
    inplace: bool = False,
    spec: PermutationSpec | None = None,
) -> nn.Module:
    """Swap output units ``i`` and ``j`` of module ``layer`` (and everything coupled to them).

    ``i`` and ``j`` may be Python or numpy integers or 0-d integer tensors; ``layer`` may be a
    normalisation layer (its units are those it normalises, see :func:`layer_group`).

    Raises:
        PermutationError: unknown layer, a layer without permutable units, or ``i``/``j`` not unit indices.
    """
    spec = _spec_for(model, example_inputs, spec)
    group = layer_group(spec, layer)
    i, j = (unit_index(value, arg, layer, group.size) for arg, value in (("i", i), ("j", j)))
    order = torch.arange(group.size)
    order[i], order[j] = j, i
    return permute(model, {group.name: order}, spec, inplace=inplace)


def verify_equivalence(model_a: nn.Module, model_b: nn.Module, example_inputs: Any = None, data: Any = None) -> float:
    """``max |f_a(x) - f_b(x)| / max |f_a(x)|`` on ``example_inputs``, in eval mode without grad.

    Args:
        model_a, model_b: the two models (both keep their train/eval mode).
        example_inputs: one batch of inputs (tensor, tuple or dict).
        data: instead of ``example_inputs``, a DataLoader or iterable of batches (labels ignored,
            e.g. a whole test split): the maxima run over all of them.

    This compares two models *with their own weights*; whether a permutation is a symmetry of the
    architecture (for every weight values) is checked by :func:`~fusion.structural_difference`.

    Returns:
        A float (0.0 for identical functions).

    Raises:
        PermutationError: neither or both of ``example_inputs`` and ``data`` given.
        DataError: ``data`` yields no batches.

    This compares two models *with their own weights*; whether a permutation is a symmetry of the
    architecture (for every weight values) is checked by :func:`~fusion.structural_difference`.
    Outputs are compared on their main tensor (:func:`fusion.checks.main_output`).
    """
    from .checks import iter_batches, main_output
    from .spec.verify import _output_tensors

    if (example_inputs is None) == (data is None):
        raise PermutationError("pass exactly one of example_inputs (one batch) and data (batches)")
    check_same_device([model_a, model_b], ["model_a", "model_b"])
    device = model_device(model_a)
    batches = ((example_inputs, None),) if data is None else iter_batches(data)
    diff = scale = 0.0
    with torch.no_grad(), eval_mode(model_a), eval_mode(model_b):
        for inputs, _ in batches:
            inputs = move_inputs(inputs, device)
            out_a = _output_tensors(main_output(run_model(model_a, inputs)))
            out_b = _output_tensors(main_output(run_model(model_b, inputs)))
            if len(out_a) != len(out_b) or not out_a:
                raise PermutationError("the two models' outputs do not have the same structure of floating tensors")
            diff = max(diff, *(float((a.double() - b.double()).abs().max()) for a, b in zip(out_a, out_b)))
            scale = max(scale, *(float(a.double().abs().max()) for a in out_a))
    return diff / scale if scale > 0 else diff
