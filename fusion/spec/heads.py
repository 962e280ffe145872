"""Head-aware permutation groups of attention layers, from their probed layouts.

The attention layers and their layouts are found by :mod:`fusion.spec.attention_probe` and
:mod:`fusion.spec.attention_layout`. From a layout come the groups (Vaswani et al. 2017; the head
symmetries used by Imfeld et al., "Transformer Fusion with Optimal Transport", ICLR 2024):

* ``heads``: whole (key/value) heads, moving q, k, v rows, ``o`` columns and bias tables;
* ``query_heads``: the query heads sharing one key/value head (grouped-query attention);
* ``head_v``: the value dimensions of one key/value head with the ``o`` columns they feed;
* ``head_qk``: the query/key dimensions of one head, jointly, except those a rotary embedding
  rotates (their frequencies are fixed by position).

Every group is then checked structurally (a random permutation must keep the float64 copy's
output to 1e-9); what fails is refused with the reason (:func:`head_refusal`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence

import torch

from .attention_layout import AttentionLayout, Slots
from .attention_probe import AttentionSearch
from .records import AxisMember, PermutationGroup, SkippedGroup

# --------------------------------------------------------------------------------------------
# Groups of a layout
# --------------------------------------------------------------------------------------------


def _members(units: Sequence[Sequence[tuple[str, int, torch.Tensor]]]) -> tuple[AxisMember, ...]:
    """Merge per-unit (key, axis, positions) into one AxisMember per (key, axis): index (units, block)."""
    merged: dict[tuple[str, int], list[list[torch.Tensor]]] = {}
    for u, unit in enumerate(units):
        for key, axis, positions in unit:
            rows = merged.setdefault((key, axis), [[] for _ in units])
            rows[u].append(positions.reshape(-1))
    members = []
    for (key, axis), rows in merged.items():
        index = torch.stack([torch.cat(r) for r in rows])
        members.append(AxisMember(key, axis, index))
    return tuple(members)


def layout_groups(layout: AttentionLayout) -> tuple[list[PermutationGroup], list[SkippedGroup]]:
    """Head groups of one layout (before verification), and what is refused up front."""
    groups, skipped = [], []
    kv, heads = layout.kv_heads, layout.heads
    per = heads // kv
    base = layout.name
    prod, cons = layout.producers, layout.consumers

    def q_rows(block: int) -> list:
        return [(k, a, pos[block * per:(block + 1) * per]) for k, a, pos in layout.query]

    def o_cols(block: int) -> list:
        return [(k, a, pos[block * per:(block + 1) * per]) for k, a, pos in layout.output]

    def rows(slots: Slots, i: int) -> list:
        return [(k, a, pos[i]) for k, a, pos in slots]

    if kv > 1:
        units = [q_rows(g) + rows(layout.key, g) + rows(layout.value, g) + o_cols(g)
                 + [(k, a, pos[g * per:(g + 1) * per]) for k, a, pos in layout.tables] for g in range(kv)]
        groups.append(PermutationGroup(f"{base}.heads", kv, _members(units), prod, cons, "heads"))
    if per > 1:
        for g in range(kv):
            units = [rows(layout.query, h) + rows(layout.output, h) + rows(layout.tables, h)
                     for h in range(g * per, (g + 1) * per)]
            name = f"{base}.kv{g}.query_heads" if kv > 1 else f"{base}.heads"
            groups.append(PermutationGroup(name, per, _members(units), prod, cons, "heads"))
    for g in range(kv):
        if layout.v_note:
            skipped.append(SkippedGroup(f"{base}.head{g}.v", layout.v_dim, layout.v_note))
        elif layout.v_dim > 1:
            units = [[(k, a, pos[g, d]) for k, a, pos in layout.value]
                     + [(k, a, pos[g * per:(g + 1) * per, d]) for k, a, pos in layout.output] for d in range(layout.v_dim)]
            groups.append(PermutationGroup(f"{base}.head{g}.v", layout.v_dim, _members(units), prod, cons, "head_v"))
        free = range(layout.rotary, layout.qk_dim)
        if layout.qk_note:
            skipped.append(SkippedGroup(f"{base}.head{g}.qk", layout.qk_dim, layout.qk_note))
            continue
        if layout.rotary:
            kept = f"; dims {layout.rotary}..{layout.qk_dim - 1} are not rotated and permute" if len(free) > 1 else ""
            skipped.append(SkippedGroup(f"{base}.head{g}.qk", layout.rotary,
                                        f"a rotary embedding rotates query/key dims 0..{layout.rotary - 1} of each head "
                                        f"with fixed frequencies{kept}"))
        if len(free) > 1:
            units = [[(k, a, pos[g * per:(g + 1) * per, d]) for k, a, pos in layout.query]
                     + [(k, a, pos[g, d]) for k, a, pos in layout.key] for d in free]
            groups.append(PermutationGroup(f"{base}.head{g}.qk", len(free), _members(units), prod, cons, "head_qk"))
    return groups, skipped


def merge_sharing(groups: list[PermutationGroup], axes: set[tuple[str, int]] | None = None
                  ) -> tuple[list[PermutationGroup], list[SkippedGroup]]:
    """Groups that move the same positions of one tensor axis (of ``axes``, or any) become one group.

    Tied weights make this necessary: T5's encoder and decoder residual streams share the
    embedding matrix, and every layer reuses the first layer's relative-position bias table, so
    their permutations must be one. Groups of unequal sizes, or reaching the shared axis at
    different positions, are refused.
    """
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)  # (tensor, axis) -> position -> group
    for i, g in enumerate(groups):
        for m in g.members:
            if axes is None or (m.name, m.axis) in axes:
                positions = owner[m.name, m.axis]
                for pos in m.index.reshape(-1).tolist():
                    parent[find(i)] = find(positions.setdefault(pos, i))
    components: dict[int, list[PermutationGroup]] = defaultdict(list)
    for i, g in enumerate(groups):
        components[find(i)].append(g)
    merged, refused = [], []
    for parts in components.values():
        members: dict[tuple[str, int], AxisMember] = {}
        reason = "" if len({g.size for g in parts}) == 1 else f"groups of different sizes share {parts[1].name}'s tensors"
        for g in parts:
            for m in g.members:
                if (m.name, m.axis) in members and not torch.equal(members[m.name, m.axis].index, m.index):
                    reason = reason or f"{m.name} (axis {m.axis}) is shared by several groups at different positions"
                members[m.name, m.axis] = m
        if reason:
            refused.extend(SkippedGroup(g.name, g.size, reason) for g in parts)
        elif len(parts) == 1:
            merged.append(parts[0])
        else:
            merged.append(PermutationGroup(parts[0].name, parts[0].size, tuple(members.values()),
                                           tuple(dict.fromkeys(p for g in parts for p in g.producers)),
                                           tuple(dict.fromkeys(c for g in parts for c in g.consumers)), parts[0].kind))
    return merged, refused


def head_groups(search: AttentionSearch, exclude: Collection[str] = ()) -> tuple[list[PermutationGroup], list[SkippedGroup]]:
    """Every head group of the layouts found (not yet verified), and the refused ones with reasons."""
    groups, skipped = [], list(search.refused)
    for layout in search.layouts:
        if layout.producers and layout.producers[0] in exclude:
            continue
        found, refused = layout_groups(layout)
        groups.extend(found)
        skipped.extend(refused)
    tables = {(k, a) for layout in search.layouts for k, a, _ in layout.tables}
    whole, refused = merge_sharing([g for g in groups if g.kind == "heads"], tables)
    skipped.extend(refused)
    return whole + [g for g in groups if g.kind != "heads"], skipped


_FAILED = {
    "heads": "whole heads (a per-head quantity the layout does not move, e.g. ALiBi slopes computed from the head "
             "index, or a bias assembled outside the projection)",
    "head_qk": "query/key dims (a position-dependent op such as a rotary embedding acts on them)",
    "head_v": "value dims",
}


def head_refusal(skipped: SkippedGroup, kind: str) -> SkippedGroup:
    """A verification refusal of a head group, with what permuting it means."""
    if kind not in _FAILED:
        return skipped
    return SkippedGroup(skipped.name, skipped.size, f"permuting {_FAILED[kind]} changed the function: {skipped.reason}",
                        skipped.kind)
