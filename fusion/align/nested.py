"""Head-aware matching of nested permutation groups (attention heads and the dimensions inside them).

Attention gives permutation groups that overlap: a ``heads`` group moves whole heads (every q, k,
v row and o column of a head), while groups inside a head move its query/key or value dimensions
(and with grouped-query attention a kv-head block holds a group of query heads, and the value
dimensions shared by them). Solving such groups one at a time fails: the similarity of A's head
``i`` and B's head ``j`` computed with the dimensions inside the heads unaligned is noise, so the
head permutation is a guess, and the dimension permutations cannot repair it.

Here a group ``G`` whose units contain whole child groups is solved with *nested* scores: the
value of matching A's unit ``i`` with B's unit ``j`` is the inner product of the positions no child
covers plus, for each child slot, the best assignment of the child's units between the two
(a linear assignment problem per pair, recursively for grandchildren). The best assignment of
``G``'s units on these scores is exact for a hidden permutation (the true pairing attains
``||A||^2`` on every term, Cauchy-Schwarz); the children are then solved inside the chosen pairs.

The tree is derived from the spec's index tables alone (a child's positions on every tensor axis
it moves lie inside one unit of its parent, with the same layout in every unit), so it covers
``nn.MultiheadAttention`` as well as fused and separate q/k/v projections and GQA blocks; groups
that overlap without such a nesting keep the plain coordinate-descent path.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from ..spec import PermutationGroup, PermutationSpec

__all__ = ["Nesting", "Slot", "nested_similarity", "nesting", "solve_family"]

State = Mapping[str, torch.Tensor]
AxisKey = tuple[str, int]


@dataclass(frozen=True, eq=False)
class Slot:
    """One child position inside every unit of a parent group.

    Attributes:
        offsets: (tensor name, axis) -> LongTensor (child size, child block): the offsets, inside
            the parent's block on that axis, of each unit of the child.
        groups: the child group at this slot of each parent unit (parent unit order).
        slots: the slots of the child itself (its own children), empty for a leaf.
    """

    offsets: dict[AxisKey, torch.Tensor]
    groups: tuple[str, ...]
    slots: tuple[Slot, ...]

    @property
    def size(self) -> int:
        return int(next(iter(self.offsets.values())).shape[0])


@dataclass(frozen=True, eq=False)
class Nesting:
    """The nesting of overlapping groups of a spec.

    Attributes:
        slots: group name -> its child slots (only groups with children).
        parent: group name -> parent group name (only nested groups).
    """

    slots: dict[str, tuple[Slot, ...]]
    parent: dict[str, str]

    def descendants(self, name: str) -> list[str]:
        """Every group nested in ``name``, parents before children."""
        out = []
        for slot in self.slots.get(name, ()):
            for child in slot.groups:
                out.append(child)
                out.extend(self.descendants(child))
        return out

    @property
    def roots(self) -> list[str]:
        """Groups that have children and no parent."""
        return [name for name in self.slots if name not in self.parent]


def _offsets_in_unit(parent: PermutationGroup, child: PermutationGroup) -> tuple[int, dict[AxisKey, torch.Tensor]] | None:
    """``(unit, offsets)`` if ``child`` lies inside one unit of ``parent`` on every axis it moves."""
    parent_members = {(m.name, m.axis): m for m in parent.members}
    unit, offsets = None, {}
    for member in child.members:
        host = parent_members.get((member.name, member.axis))
        if host is None:
            return None
        flat = host.index  # (size, block)
        where = {int(p): (u, t) for u, row in enumerate(flat.tolist()) for t, p in enumerate(row)}
        found = [where.get(int(p)) for p in member.index.reshape(-1)]
        if any(f is None for f in found):
            return None
        units = {u for u, _ in found}
        if len(units) != 1 or (unit is not None and units != {unit}):
            return None
        unit = units.pop()
        offsets[(member.name, member.axis)] = torch.tensor([t for _, t in found]).view(member.index.shape)
    if unit is None or sum(int(m.index.numel()) for m in child.members) >= sum(
            int(m.index[unit].numel()) for m in parent.members):
        return None  # a child must be strictly smaller than the parent's unit
    return unit, offsets


def nesting(spec: PermutationSpec, names: Collection[str] | None = None) -> Nesting:
    """The parent/child structure among the groups ``names`` (default: every group of ``spec``).

    A group's parent is the smallest group (fewest positions per unit) containing it inside one
    unit; a parent keeps its children only when every unit holds children of the same layout
    (same offsets), which is what the nested scores need.
    """
    groups = [g for g in spec.groups if names is None or g.name in names]
    per_unit = {g.name: sum(int(m.index.shape[1]) for m in g.members) for g in groups}
    by_tensor: dict[str, set[str]] = {}
    for g in groups:
        for m in g.members:
            by_tensor.setdefault(m.name, set()).add(g.name)
    parent: dict[str, tuple[str, int, dict[AxisKey, torch.Tensor]]] = {}
    for child in groups:
        candidates = set.intersection(*(by_tensor[m.name] for m in child.members)) - {child.name}
        best = None
        for name in sorted(candidates, key=lambda n: (per_unit[n], spec.position(n))):
            found = _offsets_in_unit(spec.group(name), child)
            if found is not None:
                best = (name, *found)
                break
        if best is not None:
            parent[child.name] = best
    children: dict[str, dict[int, list[tuple[str, dict[AxisKey, torch.Tensor]]]]] = {}
    for child, (name, unit, offsets) in parent.items():
        children.setdefault(name, {}).setdefault(unit, []).append((child, offsets))
    slots: dict[str, tuple[Slot, ...]] = {}

    def build(name: str) -> tuple[Slot, ...] | None:
        if name in slots:
            return slots[name]
        units = children.get(name)
        group = spec.group(name)
        if not units or set(units) != set(range(group.size)):
            return None
        layouts = []
        for u in range(group.size):
            entries = sorted(units[u], key=lambda e: sorted((k, int(v.min())) for k, v in e[1].items()))
            layouts.append(entries)
        first = layouts[0]
        for entries in layouts[1:]:
            if len(entries) != len(first) or any(
                    set(a[1]) != set(b[1]) or any(not torch.equal(a[1][k], b[1][k]) for k in a[1])
                    for a, b in zip(entries, first)):
                return None
        built = []
        for s, (_, offsets) in enumerate(first):
            names_at = tuple(layouts[u][s][0] for u in range(group.size))
            sub = build(names_at[0])
            if sub is not None and any(build(n) is None for n in names_at[1:]):
                sub = None
            built.append(Slot(offsets, names_at, sub or ()))
        slots[name] = tuple(built)
        return slots[name]

    for name in list(children):
        build(name)
    kept_parent = {child: name for name, ss in slots.items() for slot in ss for child in slot.groups}
    return Nesting(slots, kept_parent)


# --------------------------------------------------------------------------------------------
# Nested scores
# --------------------------------------------------------------------------------------------


def _unit_blocks(tensor: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """(size, block, rest) float64 rows of ``tensor`` at ``index`` (size, block) along ``axis``."""
    moved = tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)
    picked = moved[index.reshape(-1).to(moved.device)].double().cpu()
    return picked.reshape(index.shape[0], index.shape[1], -1)


def _assignment_values(scores: torch.Tensor) -> torch.Tensor:
    """(n_a, n_b) best assignment value of each (n_a, n_b, d, d) block of ``scores``."""
    n_a, n_b = scores.shape[:2]
    values = torch.empty(n_a, n_b, dtype=torch.float64)
    blocks = scores.numpy()
    for i in range(n_a):
        for j in range(n_b):
            rows, cols = linear_sum_assignment(blocks[i, j], maximize=True)
            values[i, j] = float(blocks[i, j][rows, cols].sum())
    return values


def _pair_values(rows_a: dict[AxisKey, torch.Tensor], rows_b: dict[AxisKey, torch.Tensor],
                 slots: tuple[Slot, ...]) -> torch.Tensor:
    """(n_a, n_b) nested scores of units given their blocks (n, block, rest) per tensor axis."""
    n_a, n_b = next(iter(rows_a.values())).shape[0], next(iter(rows_b.values())).shape[0]
    total = torch.zeros(n_a, n_b, dtype=torch.float64)
    for key, a in rows_a.items():
        covered = torch.zeros(a.shape[1], dtype=torch.bool)
        for slot in slots:
            if key in slot.offsets:
                covered[slot.offsets[key].reshape(-1)] = True
        free = ~covered
        if bool(free.any()):
            total += a[:, free].flatten(1) @ rows_b[key][:, free].flatten(1).T
    for slot in slots:
        d = slot.size
        sub_a = {k: rows_a[k][:, o.reshape(-1)].reshape(n_a * d, o.shape[1], -1) for k, o in slot.offsets.items() if k in rows_a}
        sub_b = {k: rows_b[k][:, o.reshape(-1)].reshape(n_b * d, o.shape[1], -1) for k, o in slot.offsets.items() if k in rows_b}
        if not sub_a:
            continue
        if slot.slots:
            inner = _pair_values(sub_a, sub_b, slot.slots)
        else:
            inner = sum(sub_a[k].flatten(1) @ sub_b[k].flatten(1).T for k in sub_a)
        total += _assignment_values(inner.view(n_a, d, n_b, d).permute(0, 2, 1, 3).contiguous())
    return total


def nested_similarity(
    spec: PermutationSpec,
    group: PermutationGroup,
    slots: tuple[Slot, ...],
    state_a: State,
    state_b: State,
    perms: Mapping[str, torch.Tensor],
    keys: Collection[str] | None = None,
) -> torch.Tensor:
    """(size, size) nested scores of ``group``'s units (A's unit i vs B's unit j).

    The other groups enter at ``perms``; ``group``'s descendants must be the identity there (the
    scores maximise over them). ``keys`` restricts the tensors used.
    """
    from .weight import _aligned_pair  # circular: weight matching calls this module

    rows_a, rows_b = {}, {}
    for member in group.members:
        if keys is not None and member.name not in keys:
            continue
        a, b = _aligned_pair(spec, state_a, state_b, member, group, perms)
        rows_a[(member.name, member.axis)] = _unit_blocks(a, member.axis, member.index)
        rows_b[(member.name, member.axis)] = _unit_blocks(b, member.axis, member.index)
    if not rows_a:
        return torch.zeros(group.size, group.size, dtype=torch.float64)
    return _pair_values(rows_a, rows_b, slots)


def solve_family(
    spec: PermutationSpec,
    root: str,
    tree: Nesting,
    state_a: State,
    state_b: State,
    perms: Mapping[str, torch.Tensor],
    keys: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Permutations of ``root`` and every group nested in it, top down, the rest fixed at ``perms``.

    Each group is solved on its nested scores (children maximised over), then its children on
    theirs with the parent fixed, down to the leaves (plain inner products).

    Returns:
        group name -> permutation, for ``root`` and its descendants.
    """
    from .weight import group_similarity, solve_assignment

    current = dict(perms)
    order = [root, *tree.descendants(root)]
    for name in order:
        current[name] = torch.arange(spec.group(name).size)
    solved: dict[str, torch.Tensor] = {}
    for name in order:
        group = spec.group(name)
        slots = tree.slots.get(name, ())
        if slots:
            similarity = nested_similarity(spec, group, slots, state_a, state_b, current, keys)
        else:
            similarity = group_similarity(spec, group, state_a, state_b, current, keys)
        current[name] = solved[name] = solve_assignment(similarity)
    return solved
