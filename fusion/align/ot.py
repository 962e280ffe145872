"""Optimal-transport alignment (Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020).

Groups are solved one at a time in module order. The ground cost between A's unit i and B's
unit j is the squared distance of their incoming weights (``cost="weight"``; B's weights first
carried into A's basis through the transports already solved) or of their activations on data
(``cost="activation"``, streamed). POT solves the transport: exactly (``ot.emd``) or with entropic
regularisation (``ot.sinkhorn``). For equal widths the exact plan is a permutation (times 1/n);
for unequal widths the plans are soft maps, and :func:`transport_state` carries B's weights
onto A's widths with them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import ot
import torch
from torch import nn

from ..errors import AlignmentError
from ..progress import tqdm
from ..spec import AxisMember, PermutationSpec
from .nested import nesting, solve_family
from .stats import collect_pair_stats, sites_for
from .weight import resolved_tensors, unit_rows

__all__ = ["SOLVERS", "ot_alignment", "solve_transport", "transport_state"]

SOLVERS = ("emd", "sinkhorn")
State = Mapping[str, torch.Tensor]


def solve_transport(cost: torch.Tensor, solver: str = "emd", reg: float = 0.01) -> torch.Tensor:
    """The transport plan (size_a, size_b) between uniform marginals for a ground ``cost`` matrix."""
    size_a, size_b = cost.shape
    a, b = np.full(size_a, 1.0 / size_a), np.full(size_b, 1.0 / size_b)
    m = cost.double().cpu().numpy()
    if solver == "emd":
        plan = ot.emd(a, b, m)
    elif solver == "sinkhorn":
        scale = m.max() if m.max() > 0 else 1.0
        plan = ot.sinkhorn(a, b, m / scale, reg)
    else:
        raise AlignmentError(f"Unknown solver {solver!r}; choose one of {SOLVERS}")
    return torch.as_tensor(plan, dtype=torch.float64)


def _pairs_by_axis(
    key: str, spec_a: PermutationSpec, spec_b: PermutationSpec, maps: Mapping[str, torch.Tensor]
) -> dict[int, list[tuple[AxisMember, AxisMember, torch.Tensor]]]:
    by_axis: dict[int, list[tuple[AxisMember, AxisMember, torch.Tensor]]] = defaultdict(list)
    for group, member_a in spec_a.members_of(key):
        if group.name not in maps:
            continue
        member_b = next(m for m in spec_b.group(group.name).members if (m.name, m.axis) == (key, member_a.axis))
        by_axis[member_a.axis].append((member_a, member_b, maps[group.name]))
    return by_axis


def _transport_axis(tensor: torch.Tensor, axis: int, pairs: list, length: int) -> torch.Tensor:
    """Carry ``tensor`` along ``axis`` from B's units onto A's (``length`` positions)."""
    moved = tensor.movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    out = flat.new_zeros(length, flat.shape[1])
    covered_a = torch.cat([m_a.index.reshape(-1) for m_a, _, _ in pairs])
    covered_b = torch.cat([m_b.index.reshape(-1) for _, m_b, _ in pairs])
    free_a = torch.ones(length, dtype=torch.bool)
    free_a[covered_a] = False
    free_b = torch.ones(flat.shape[0], dtype=torch.bool)
    free_b[covered_b] = False
    if int(free_a.sum()) != int(free_b.sum()):
        raise AlignmentError(f"axis {axis} has units outside any group whose count differs between the models")
    out[free_a.to(out.device)] = flat[free_b.to(flat.device)]
    for member_a, member_b, mapping in pairs:
        if member_a.block != member_b.block:
            raise AlignmentError(
                f"{member_a.name} (axis {axis}): units span {member_a.block} vs {member_b.block} positions"
            )
        rows = flat[member_b.index.reshape(-1).to(flat.device)].reshape(member_b.index.shape[0], member_b.block, -1)
        mixed = torch.einsum("ij,jbr->ibr", mapping.to(flat.device, flat.dtype), rows)
        out[member_a.index.reshape(-1).to(out.device)] = mixed.reshape(-1, flat.shape[1])
    return out.reshape(length, *moved.shape[1:]).movedim(0, axis)


def transport_tensor(
    key: str, tensor: torch.Tensor, spec_a: PermutationSpec, spec_b: PermutationSpec,
    maps: Mapping[str, torch.Tensor], skip_axis: int | None = None,
) -> torch.Tensor:
    """``tensor`` (B's ``key``) with every solved group's map applied, except on ``skip_axis``."""
    if not tensor.is_floating_point():
        return tensor
    for axis, pairs in _pairs_by_axis(key, spec_a, spec_b, maps).items():
        if axis == skip_axis:
            continue
        if all(m.shape[0] == m.shape[1] for _, _, m in pairs):
            for pair in pairs:  # equal widths: one group after another, in spec order (groups may overlap)
                tensor = _transport_axis(tensor, axis, [pair], tensor.shape[axis])
        else:  # the axis changes length: its groups must cover disjoint positions
            tensor = _transport_axis(tensor, axis, pairs, spec_a.shapes[key][axis])
    return tensor


def transport_state(
    state_b: State, spec_a: PermutationSpec, spec_b: PermutationSpec, maps: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """B's state dict carried onto A's widths: every grouped axis mixed by ``maps[group]``.

    ``maps[g]`` has shape (size_a, size_b); row i gives the weights of B's units forming A's unit
    i (``size_a`` times the transport plan, so a permutation plan becomes a permutation matrix).
    """
    out = {}
    for key, tensor in state_b.items():
        moved = transport_tensor(key, tensor, spec_a, spec_b, maps)
        if tuple(moved.shape) != spec_a.shapes[key]:
            raise AlignmentError(
                f"{key!r}: shape {tuple(tensor.shape)} cannot be carried onto {spec_a.shapes[key]} "
                "(an axis that differs is not covered by a permutation group)"
            )
        out[key] = moved
    return out


def _weight_cost(
    group_name: str, spec_a: PermutationSpec, spec_b: PermutationSpec, state_a: State, state_b: State,
    maps: Mapping[str, torch.Tensor], keys: Collection[str] | None,
) -> torch.Tensor | None:
    group_a, group_b = spec_a.group(group_name), spec_b.group(group_name)
    sq_a = torch.zeros(group_a.size, dtype=torch.float64)
    sq_b = torch.zeros(group_b.size, dtype=torch.float64)
    cross = torch.zeros(group_a.size, group_b.size, dtype=torch.float64)
    used = False
    ready = resolved_tensors(spec_a, group_a, maps.keys(), keys)
    for resolved_only in (True, False):  # prefer tensors whose other axes are already in A's basis
        for member_a in group_a.members:
            if (keys is not None and member_a.name not in keys) or (resolved_only and member_a.name not in ready):
                continue
            member_b = next(m for m in group_b.members if (m.name, m.axis) == (member_a.name, member_a.axis))
            tensor_b = transport_tensor(member_a.name, state_b[member_a.name], spec_a, spec_b, maps, member_a.axis)
            shape_a, shape_b = list(spec_a.shapes[member_a.name]), list(tensor_b.shape)
            shape_a[member_a.axis] = shape_b[member_a.axis] = 0
            if shape_a != shape_b:  # other axes not yet carried onto A's widths: not comparable
                continue
            rows_a = unit_rows(state_a[member_a.name], member_a).double().cpu()
            rows_b = unit_rows(tensor_b, member_b).double().cpu()
            sq_a += (rows_a**2).sum(1)
            sq_b += (rows_b**2).sum(1)
            cross += rows_a @ rows_b.T
            used = True
        if used:
            break
    if not used:
        return None
    return (sq_a[:, None] + sq_b[None, :] - 2 * cross).clamp_min(0)


def ot_alignment(
    spec_a: PermutationSpec,
    spec_b: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    cost: str = "weight",
    solver: str = "emd",
    reg: float = 0.01,
    data: Any = None,
    progress: bool = True,
    keys: Collection[str] | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Transport plans from B's units to A's, one per group, solved in module order.

    Returns:
        ``(plans, history)``: group name -> plan of shape (size_a, size_b) with uniform marginals,
        and the transport cost <plan, ground cost> of each group.
    """
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    activation_cost: dict[str, torch.Tensor] = {}
    if cost == "activation":
        sites_a, missing = sites_for(spec_a, model_a)
        sites_b, _ = sites_for(spec_b, model_b)
        sites_b = {k: v for k, v in sites_b.items() if k in sites_a}
        stats = collect_pair_stats(model_a, model_b, sites_a, sites_b, data, progress=progress)
        activation_cost = {name: pair.squared_distance() for name, pair in stats.items()}
    maps: dict[str, torch.Tensor] = {}
    plans: dict[str, torch.Tensor] = {}
    history = []
    families = _nested_families(spec_a) if spec_a.shapes == spec_b.shapes else {}
    for group in tqdm(spec_a.groups, desc="optimal transport", disable=not progress, leave=False):
        if group.name in plans:
            continue
        if group.name in families:  # heads and within-head dims of equal count: one joint, exact assignment
            for name, perm in _solve_nested(spec_a, families[group.name], state_a, state_b, maps, keys).items():
                size = spec_a.group(name).size
                plans[name] = torch.zeros(size, size, dtype=torch.float64)
                plans[name][torch.arange(size), perm] = 1.0 / size
                maps[name] = plans[name] * size
                ground = _weight_cost(name, spec_a, spec_b, state_a, state_b, maps, keys)
                history.append(float((plans[name] * ground).sum()) if ground is not None else 0.0)
            continue
        ground = activation_cost.get(group.name)
        if ground is None:
            ground = _weight_cost(group.name, spec_a, spec_b, state_a, state_b, maps, keys)
        if ground is None:
            raise AlignmentError(
                f"group {group.name!r} has no weights comparable across the two widths; "
                "pass data and cost='activation'"
            )
        plan = solve_transport(ground, solver, reg)
        plans[group.name] = plan
        maps[group.name] = plan * group.size
        history.append(float((plan * ground).sum()))
    return plans, history


def _nested_families(spec: PermutationSpec) -> dict[str, tuple[str, Any]]:
    """Group name -> (root, nesting) for the nested attention groups of models of equal widths."""
    tree = nesting(spec)
    return {name: (root, tree) for root in tree.roots for name in (root, *tree.descendants(root))}


def _solve_nested(
    spec: PermutationSpec, family: tuple[str, Any], state_a: State, state_b: State,
    maps: Mapping[str, torch.Tensor], keys: Collection[str] | None,
) -> dict[str, torch.Tensor]:
    """Permutations of a nested family, with the groups solved so far (permutation plans) fixed."""
    root, tree = family
    perms = {name: m.argmax(1) for name, m in maps.items() if m.shape[0] == m.shape[1]}
    perms.update({g.name: torch.arange(g.size) for g in spec.groups if g.name not in perms})
    return solve_family(spec, root, tree, state_a, state_b, perms, keys)
