"""Apply permutations: function-preserving neuron permutation, swaps and equivalence checks.

A permutation of a group is a LongTensor ``perm`` of length ``group.size`` where ``perm[i]`` is
the unit of the source model that lands at position ``i``. :func:`permute` applies a dict of such
permutations (group name -> perm; absent groups stay in place) to every coupled tensor at once, so
the permuted model computes the same function. Everything here is pure unless ``inplace=True``.
"""

from __future__ import annotations

import copy
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
    "permute",
    "permute_axis",
    "axis_order",
    "permute_layer",
    "permute_state_dict",
    "random_permutation",
    "swap_neurons",
    "verify_equivalence",
]

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


def permute_layer(
    model: nn.Module,
    layer: str,
    order: Any,
    example_inputs: Any = None,
    inplace: bool = False,
    spec: PermutationSpec | None = None,
) -> nn.Module:
    """Reorder the output units of module ``layer`` by ``order``, moving every coupled tensor.

    Works on layers that feed skip connections too (the whole residual stream moves). ``order``
    is a permutation of the layer's group (``order[i]`` = unit landing at ``i``).

    Raises:
        PermutationError: ``layer`` does not exist or produces no permutable units.
    """
    spec = _spec_for(model, example_inputs, spec)
    group = spec.group_of_layer(layer)
    return permute(model, {group.name: order}, spec, inplace=inplace)


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

    Raises:
        PermutationError: unknown layer, a layer without permutable units, or ``i``/``j`` out of range.
    """
    spec = _spec_for(model, example_inputs, spec)
    group = spec.group_of_layer(layer)
    for arg, value in (("i", i), ("j", j)):
        if not isinstance(value, (int, np.integer)) or not 0 <= int(value) < group.size:
            raise PermutationError(f"{arg}={value!r} is not a unit index of {layer!r} (size {group.size})")
    order = torch.arange(group.size)
    order[int(i)], order[int(j)] = int(j), int(i)
    return permute(model, {group.name: order}, spec, inplace=inplace)


def verify_equivalence(model_a: nn.Module, model_b: nn.Module, example_inputs: Any) -> float:
    """``max |f_a(x) - f_b(x)| / max |f_a(x)|`` on ``example_inputs``, in eval mode without grad.

    Both models keep their train/eval mode. Returns a float (0.0 for identical functions).

    This compares two models *with their own weights*; whether a permutation is a symmetry of the
    architecture (for every weight values) is checked by :func:`~fusion.structural_difference`.
    """
    from .spec import relative_difference

    check_same_device([model_a, model_b], ["model_a", "model_b"])
    inputs = move_inputs(example_inputs, model_device(model_a))
    with torch.no_grad(), eval_mode(model_a), eval_mode(model_b):
        out_a = run_model(model_a, inputs)
        out_b = run_model(model_b, inputs)
    return relative_difference(out_a, out_b)
