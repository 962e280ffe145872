"""Where each member's units live in a concatenated model: its permutation groups matched to the members'.

The wide skeleton is traced with its own permutation spec (:mod:`fusion.fuse.concat_skeleton`). Its
groups are matched to the members' by family (same kind, producers, consumers and tensor axes), and
each match is one of three patterns (:class:`GroupLink`): the members' units side by side, the
lock-step index columns of a grouped convolution or GroupNorm, or one of ``N`` copies of a member
group (a conv group's channels, an attention head). The matches are recorded as position tables,
``(key, axis) -> (N, L)`` wide positions of every member position, which :func:`block_index` and
:func:`read_block` turn into member ``k``'s block of a wide tensor.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConcatError
from ..spec import PermutationGroup, PermutationSpec

__all__ = ["BLOCKS", "GROUPS", "UNITS", "GroupLink", "block_index", "read_block"]

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
# Reading a member's block of a wide tensor
# --------------------------------------------------------------------------------------------


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
