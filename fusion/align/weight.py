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

from ..permute import (
    Permutations,
    identity_permutation,
    permute_axis,
    permute_state_dict,
)
from ..progress import tqdm
from ..spec import AxisMember, PermutationGroup, PermutationSpec
from .nested import Nesting, nesting, solve_family

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
        # products in the tensors' own precision, accumulated in float64
        similarity += (unit_rows(a, member) @ unit_rows(b, member).T).double().cpu()
    return similarity


def matching_objective(
    spec: PermutationSpec, state_a: State, state_b: State, perms: Mapping[str, torch.Tensor],
    keys: Collection[str] | None = None,
) -> float:
    """Sum over tensors (``keys``, default all floating tensors) of <A, permuted B>."""
    return _inner_products(state_a, permute_state_dict(state_b, spec, perms), keys)


def _inner_products(state_a: State, state_b: State, keys: Collection[str] | None) -> float:
    total = 0.0
    for key, a in state_a.items():
        if (keys is None or key in keys) and a.is_floating_point():
            total += float((a.double() * state_b[key].double()).sum())
    return total


def solve_assignment(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation maximising ``sum_i similarity[i, perm[i]]`` (LongTensor)."""
    rows, cols = linear_sum_assignment(similarity.numpy(), maximize=True)
    perm = torch.empty(similarity.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


class _Workspace:
    """Model B with all current permutations applied, kept up to date as they change.

    The similarity of a group whose positions no other group shares (every group but attention's
    overlapping head groups) is read off this permuted copy: with M = A's unit rows times the
    permuted B's unit rows, the similarity to B's units before this group's own permutation is
    ``M[:, argsort(perm)]``. That avoids re-permuting every neighbouring tensor for every solve;
    overlapping groups take the exact general path (:func:`group_similarity`).
    """

    def __init__(self, spec: PermutationSpec, state_a: State, state_b: State,
                 perms: Mapping[str, torch.Tensor], keys: Collection[str] | None):
        self.spec, self.state_a, self.state_b, self.keys = spec, state_a, state_b, keys
        self.perms = dict(perms)
        self.permuted = dict(permute_state_dict(state_b, spec, self.perms))
        self.overlapping = _overlapping_groups(spec)
        self._rows_a: dict[tuple[str, str, int], torch.Tensor] = {}

    def similarity(self, group: PermutationGroup, keys: Collection[str] | None = None) -> torch.Tensor:
        keys = self.keys if keys is None else keys
        if group.name in self.overlapping:
            return group_similarity(self.spec, group, self.state_a, self.state_b, self.perms, keys)
        product = None
        for member in group.members:
            if keys is not None and member.name not in keys:
                continue
            cache = (group.name, member.name, member.axis)
            if cache not in self._rows_a:
                self._rows_a[cache] = unit_rows(self.state_a[member.name], member)
            rows_a = self._rows_a[cache]
            term = rows_a @ unit_rows(self.permuted[member.name], member).to(rows_a.dtype).T
            product = term if product is None else product + term
        if product is None:
            return torch.zeros(group.size, group.size, dtype=torch.float64)
        return product.double().cpu()[:, torch.argsort(self.perms[group.name])]

    def objective(self, groups: Collection[str] | None = None) -> float:
        """Sum over the tensors (``keys``) of <A, permuted B> at the current permutations; with
        ``groups``, only over the tensors those groups move."""
        if groups is None:
            return _inner_products(self.state_a, self.permuted, self.keys)
        names = {m.name for g in groups for m in self.spec.group(g).members}
        return _inner_products({k: self.state_a[k] for k in names}, self.permuted, self.keys)

    def solve_nested(self, root: str, tree: Nesting) -> bool:
        """Re-solve ``root`` and the groups nested in it jointly (head-aware, see
        :mod:`fusion.align.nested`); keep the result if it raises the objective. Returns whether it did."""
        family = [root, *tree.descendants(root)]
        old = {name: self.perms[name] for name in family}
        new = solve_family(self.spec, root, tree, self.state_a, self.state_b, self.perms, self.keys)
        if all(torch.equal(new[name], old[name]) for name in family):
            return False
        before = self.objective(family)
        for name in family:
            self.set(self.spec.group(name), new[name])
        if self.objective(family) > before + 1e-12 * max(1.0, abs(before)):
            return True
        for name in family:
            self.set(self.spec.group(name), old[name])
        return False

    def set(self, group: PermutationGroup, perm: torch.Tensor) -> None:
        """Make ``perm`` the group's permutation and update the permuted copy of B."""
        old = self.perms[group.name]
        self.perms[group.name] = perm
        if group.name in self.overlapping:  # order matters: re-apply every group to these tensors
            names = {m.name for m in group.members}
            fresh = permute_state_dict({n: self.state_b[n] for n in names}, self.spec.groups, self.perms)
            self.permuted.update(fresh)
            return
        change = torch.argsort(old)[perm]  # unit i of the new copy is unit change[i] of the old one
        for member in group.members:
            self.permuted[member.name] = permute_axis(self.permuted[member.name], member, change)


def _overlapping_groups(spec: PermutationSpec) -> set[str]:
    """Groups that share a position of some tensor axis with another group (attention heads)."""
    overlapping: set[str] = set()
    for name in spec.permuted_tensors:
        seen: dict[tuple[int, int], str] = {}
        for group, member in spec.members_of(name):
            for position in member.index.reshape(-1).tolist():
                other = seen.setdefault((member.axis, position), group.name)
                if other != group.name:
                    overlapping |= {group.name, other}
    return overlapping


def resolved_tensors(
    spec: PermutationSpec, group: PermutationGroup, done: Collection[str], keys: Collection[str] | None = None
) -> set[str]:
    """The group's tensors (within ``keys``) whose other permuted axes all belong to groups in ``done``."""
    return {
        m.name for m in group.members
        if (keys is None or m.name in keys)
        and all(g.name in done for g, other in spec.members_of(m.name) if other.axis != m.axis)
    }


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
    workspace = _Workspace(spec, state_a, state_b, perms, keys)
    done = {g.name for g in spec.groups} - {g.name for g in groups}
    tree = nesting(spec, {g.name for g in groups})
    roots = {name: root for root in tree.roots for name in (root, *tree.descendants(root))}
    for group in groups:
        if group.name in done:
            continue
        if group.name in roots:  # attention heads and the dims inside them: solved together
            family = [roots[group.name], *tree.descendants(roots[group.name])]
            new = solve_family(spec, family[0], tree, state_a, state_b, workspace.perms, keys)
            for name in family:
                workspace.set(spec.group(name), new[name])
            done.update(family)
            continue
        ready = resolved_tensors(spec, group, done, keys)
        workspace.set(group, solve_assignment(workspace.similarity(group, ready or keys)))
        done.add(group.name)
    return workspace.perms


def _neighbours(spec: PermutationSpec) -> dict[str, set[str]]:
    """For each group, the groups whose permutation enters its similarity (sharing a tensor)."""
    neighbours: dict[str, set[str]] = {g.name: set() for g in spec.groups}
    for name in spec.permuted_tensors:
        pairs = spec.members_of(name)
        for group, member in pairs:
            others = {other.name for other, m in pairs if (other.name, m.axis) != (group.name, member.axis)}
            neighbours[group.name] |= others
    return neighbours


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
    tol: float = 1e-4,
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
        tol: stop when a sweep raises the objective by less than ``tol`` times its magnitude.
            The last sweeps of a long descent gain little (ResNet-50: sweeps 8-19 add 3e-4 of the
            objective); ``tol=0`` runs until a sweep changes nothing, Git Re-Basin's rule.

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
        perms = layerwise_matching(spec, state_a, state_b, solved, perms, keys)
    workspace = _Workspace(spec, state_a, state_b, perms, keys)
    rng = np.random.default_rng(seed)
    history: list[float] = []
    # A group's similarity only depends on the groups it shares a tensor with: after a sweep,
    # re-solve just the groups whose neighbours changed (the result is the same, the work less).
    neighbours = _neighbours(spec)
    stale = {g.name for g in solved}
    tree = nesting(spec, stale)
    roots = set(tree.roots)
    bar = tqdm(range(max_iter), desc="weight matching", disable=not progress, leave=False)
    for _ in bar:
        improved = False
        for index in rng.permutation(len(solved)):
            group = solved[index]
            if group.name not in stale:
                continue
            stale.discard(group.name)
            if group.name in roots:
                if workspace.solve_nested(group.name, tree):
                    improved = True
                    for name in (group.name, *tree.descendants(group.name)):
                        stale |= neighbours[name]
                continue
            similarity = workspace.similarity(group)
            new = solve_assignment(similarity)
            rows = torch.arange(group.size)
            old_value = float(similarity[rows, workspace.perms[group.name]].sum())
            new_value = float(similarity[rows, new].sum())
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                improved = True
                workspace.set(group, new)
                stale |= neighbours[group.name]
        history.append(workspace.objective())
        bar.set_postfix(objective=f"{history[-1]:.4g}")
        if not improved:
            break
        if len(history) > 1 and history[-1] - history[-2] < tol * abs(history[-2]):
            break
    log.debug("weight matching stopped after %d sweeps, objective %.6g", len(history), history[-1] if history else 0)
    return workspace.perms, history
