"""Weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023).

Coordinate descent over the spec's permutation groups, in a random order each sweep: for one
group, with every other group's current permutation applied to model B, the permutation that
maximises the summed inner products of all weights the group touches is a linear assignment
problem (``scipy.optimize.linear_sum_assignment``). Stops when a sweep brings no improvement or
after ``max_iter`` sweeps. Works on state dicts; nothing is modified.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from ..permute import (
    Permutations,
    identity_permutation,
    permute_axis,
    permute_state_dict,
)
from ..spec import AxisMember, PermutationGroup, PermutationSpec

__all__ = [
    "group_similarity",
    "layerwise_matching",
    "matching_objective",
    "solve_assignment",
    "unit_rows",
    "weight_matching",
]

log = logging.getLogger(__name__)

State = Mapping[str, torch.Tensor]


def unit_rows(tensor: torch.Tensor, member: AxisMember) -> torch.Tensor:
    """The slices of ``tensor`` that each unit of ``member`` owns, flattened: shape (size, block * rest)."""
    moved = tensor.movedim(member.axis, 0).reshape(tensor.shape[member.axis], -1)
    return moved[member.index.reshape(-1).to(tensor.device)].reshape(member.index.shape[0], -1)


def _aligned_pair(
    spec: PermutationSpec, state_a: State, state_b: State, member: AxisMember, group: PermutationGroup,
    perms: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A's and B's tensor for solving ``group`` on ``member``'s axis with the other groups fixed.

    Permutations apply in spec order. Groups before ``group`` are applied to B; groups after it
    are undone on A instead (<A, later(g(earlier(B)))> = <later^-1(A), g(earlier(B))>), which is
    exact also where groups overlap on one axis (attention heads and within-head dims).
    """
    position = spec.position(group.name)
    a, b = state_a[member.name], state_b[member.name]
    pairs = spec.members_of(member.name)
    for other, other_member in pairs:
        if other.name in perms and (other.name, other_member.axis) != (group.name, member.axis) \
                and spec.position(other.name) <= position:
            b = permute_axis(b, other_member, perms[other.name])
    for other, other_member in reversed(pairs):
        if other.name in perms and spec.position(other.name) > position:
            a = permute_axis(a, other_member, torch.argsort(perms[other.name]))
    return a, b


def group_similarity(
    spec: PermutationSpec,
    group: PermutationGroup,
    state_a: State,
    state_b: State,
    perms: Mapping[str, torch.Tensor],
    keys: Collection[str] | None = None,
) -> torch.Tensor:
    """(size, size) float64 matrix: entry (i, j) sums <A's unit i, B's unit j> over the group's tensors.

    Args:
        keys: restrict to these state-dict keys (e.g. parameters only); default all members.
    """
    similarity = torch.zeros(group.size, group.size, dtype=torch.float64)
    for member in group.members:
        if keys is not None and member.name not in keys:
            continue
        a, b = _aligned_pair(spec, state_a, state_b, member, group, perms)
        rows_a = unit_rows(a, member).double()
        rows_b = unit_rows(b, member).double()
        similarity += (rows_a @ rows_b.T).cpu()
    return similarity


def matching_objective(
    spec: PermutationSpec, state_a: State, state_b: State, perms: Mapping[str, torch.Tensor],
    keys: Collection[str] | None = None,
) -> float:
    """Sum over tensors (``keys``, default all floating tensors) of <A, permuted B>."""
    permuted = permute_state_dict(state_b, spec, perms)
    total = 0.0
    for key, a in state_a.items():
        if (keys is None or key in keys) and a.is_floating_point():
            total += float((a.double() * permuted[key].double()).sum())
    return total


def solve_assignment(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation maximising ``sum_i similarity[i, perm[i]]`` (LongTensor)."""
    rows, cols = linear_sum_assignment(similarity.numpy(), maximize=True)
    perm = torch.empty(similarity.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def layerwise_matching(
    spec: PermutationSpec,
    state_a: State,
    state_b: State,
    groups: list[PermutationGroup],
    perms: Mapping[str, torch.Tensor],
    keys: Collection[str] | None = None,
) -> Permutations:
    """One pass over ``groups`` in module order; each solved from the tensors whose other grouped
    axes belong to groups solved before it (all of its tensors when none qualifies)."""
    perms = dict(perms)
    done = {g.name for g in spec.groups} - {g.name for g in groups}
    for group in groups:
        ready = {
            m.name for m in group.members
            if (keys is None or m.name in keys)
            and all(g.name in done for g, other in spec.members_of(m.name) if other.axis != m.axis)
        }
        similarity = group_similarity(spec, group, state_a, state_b, perms, ready or keys)
        perms[group.name] = solve_assignment(similarity)
        done.add(group.name)
    return perms


def weight_matching(
    spec: PermutationSpec,
    state_a: State,
    state_b: State,
    max_iter: int = 100,
    seed: int = 0,
    progress: bool = True,
    keys: Collection[str] | None = None,
    init: Mapping[str, torch.Tensor] | str | None = "layerwise",
    groups: Collection[str] | None = None,
) -> tuple[Permutations, list[float]]:
    """Permutations of B's units that maximise the summed inner products with A's weights.

    Args:
        spec: the permutation spec of the architecture.
        state_a, state_b: state dicts of the two models (same keys and shapes).
        max_iter: the most sweeps over all groups.
        seed: seed of the random group order.
        progress: show a tqdm bar over sweeps.
        keys: tensors that enter the objective (default: all of them).
        init: initial permutations: ``"layerwise"`` (default) solves each group once in module
            order from the tensors whose other axes are already matched, which avoids most poor
            local optima of the descent (e.g. on MobileNet's depthwise blocks); ``"identity"``
            or None starts from the identity (Git Re-Basin's choice); a dict gives them directly.
        groups: restrict the descent to these group names (the others keep their ``init``).

    Returns:
        ``(perms, history)``: the permutations and the objective after each sweep.
    """
    solved = [g for g in spec.groups if groups is None or g.name in groups]
    if isinstance(init, str) and init not in ("layerwise", "identity"):
        raise ValueError(f"Unknown init {init!r}; choose 'layerwise', 'identity' or a dict of permutations")
    perms = identity_permutation(spec)
    if isinstance(init, Mapping):
        perms.update({k: v.clone() for k, v in init.items()})
    elif init == "layerwise":
        perms.update(layerwise_matching(spec, state_a, state_b, solved, perms, keys))
    rng = np.random.default_rng(seed)
    history: list[float] = []
    bar = tqdm(range(max_iter), desc="weight matching", disable=not progress, leave=False)
    for _ in bar:
        improved = False
        for index in rng.permutation(len(solved)):
            group = solved[index]
            similarity = group_similarity(spec, group, state_a, state_b, perms, keys)
            new = solve_assignment(similarity)
            rows = torch.arange(group.size)
            old_value = float(similarity[rows, perms[group.name]].sum())
            new_value = float(similarity[rows, new].sum())
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                improved = True
                perms[group.name] = new
        history.append(matching_objective(spec, state_a, state_b, perms, keys))
        bar.set_postfix(objective=f"{history[-1]:.4g}")
        if not improved:
            break
    log.debug("weight matching stopped after %d sweeps, objective %.6g", len(history), history[-1] if history else 0)
    return perms, history
