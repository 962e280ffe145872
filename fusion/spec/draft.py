"""From torch-pruning groups to permutation groups: index mapping, units, lock-step and partitions."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._lazy import tp
from .hf_layers import is_transposed_linear
from .records import AxisMember, PermutationGroup
from .rules import _axis_rule, _Unsupported


def _first_in_module_order(names: Sequence[str], order: dict[str, int]) -> str:
    def rank(name: str) -> tuple[int, str]:
        module = name.rsplit(".", 1)[0] if name not in order else name
        return (order.get(module, order.get(name, len(order))), name)

    return min(names, key=rank)



_PASS_THROUGH = {
    tp.ops.OPTYPE.ELEMENTWISE,
    tp.ops.OPTYPE.CONCAT,
    tp.ops.OPTYPE.SPLIT,
    tp.ops.OPTYPE.RESHAPE,
    tp.ops.OPTYPE.UNBIND,
    tp.ops.OPTYPE.EXPAND,
    tp.ops.OPTYPE.SLICE,
}
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.MultiheadAttention, nn.RNNBase)


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, _LAYERS) or is_transposed_linear(module)


class _RootMap:
    """Positions along one tensor axis of each root unit of a torch-pruning group, as tensors."""

    def __init__(self, idxs: Sequence[int], roots: Sequence[int], size: int):
        positions = torch.as_tensor(list(idxs), dtype=torch.long)
        root = torch.as_tensor(list(roots), dtype=torch.long)
        order = torch.argsort(root * (int(positions.max()) + 1 if len(positions) else 1) + positions)
        self.roots, self.positions = root[order], positions[order]
        self.counts = torch.bincount(self.roots, minlength=size)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    @property
    def covered(self) -> torch.Tensor:
        """(size,) bool: which roots reach this axis."""
        return self.counts > 0

    def single_positions(self, what: str) -> torch.Tensor:
        """(size,) the one position of each root (-1 if absent); raises if a root has several."""
        if int(self.counts.max()) > 1:
            raise _Unsupported(f"{what} reads one unit at several positions")
        out = torch.full_like(self.counts, -1)
        out[self.roots] = self.positions
        return out

    def rows(self, units: torch.Tensor) -> torch.Tensor | None:
        """(units, k * c) positions of ``units`` (a (units, k) root matrix), or None if none is reached."""
        counts = self.counts[units]
        if not bool(counts.any()):
            return None
        c = int(counts.max())
        if bool((counts != c).any()):
            raise _Unsupported("units map unevenly onto one tensor axis")
        index = self.starts[units][..., None] + torch.arange(c)
        return self.positions[index].reshape(units.shape[0], -1)


@dataclass
class _Entry:
    """One tensor axis of a torch-pruning group, before units are formed."""

    key: str
    axis: int
    mapping: _RootMap
    reduce_mod: int = 0  # >0: positions are taken modulo this (a grouped conv's per-group input axis)


@dataclass
class _Draft:
    """A torch-pruning group translated into tensor axes, not yet split into units."""

    entries: list[_Entry] = field(default_factory=list)
    producers: list[tuple[str, _RootMap]] = field(default_factory=list)
    consumers: list[tuple[str, _RootMap]] = field(default_factory=list)
    lockstep: list[tuple[_RootMap, int]] = field(default_factory=list)  # (mapping, block)
    partitions: list[torch.Tensor] = field(default_factory=list)  # per root: the block it must stay in
    depthwise_in: list[str] = field(default_factory=list)
    out_modules: set = field(default_factory=set)
    reaches_output: bool = False
    size: int = 0


def _draft_group(graph: tp.DependencyGraph, tp_group: Any, canonical: dict[str, str]) -> _Draft:
    """Translate one torch-pruning group into tensor axes (raises _Unsupported)."""
    draft = _Draft(size=len(tp_group[0].idxs))
    for item in tp_group:
        node = item.dep.target
        is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
        if node.type == tp.ops.OPTYPE.OUTPUT:
            draft.reaches_output = True
            continue
        if node.type in _PASS_THROUGH:
            continue
        mapping = _RootMap(item.idxs, item.root_idxs, draft.size)
        if node.type == tp.ops.OPTYPE.PARAMETER:
            key = canonical.get(graph._param_to_name[node.module], graph._param_to_name[node.module])
            axis = node.pruning_dim % node.module.dim()
            draft.entries.append(_Entry(key, axis, mapping))
            draft.producers.append((key, mapping))
            continue
        module = node.module
        name = graph._module2name[module]
        if is_out and not node.outputs:
            draft.reaches_output = True
        rule = _axis_rule(module, is_out, name)
        if is_out:
            draft.out_modules.add(name)
            if _is_layer(module):
                draft.producers.append((name, mapping))
        elif _is_layer(module):
            draft.consumers.append((name, mapping))
        if isinstance(module, nn.MultiheadAttention):
            draft.consumers.append((name, mapping))
        if rule.lockstep == 0:
            draft.depthwise_in.append(name)
        if is_out and isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.out_channels:
            # a grouped conv's output channel must stay inside its conv group
            positions = mapping.single_positions(f"grouped convolution {name}")
            block_of = positions // (module.out_channels // module.groups)
            draft.partitions.append(torch.where(positions >= 0, block_of, -1))
        block = 0
        if rule.lockstep > 1:
            channels = module.in_channels if isinstance(module, nn.modules.conv._ConvNd) else module.num_channels
            block = channels // rule.lockstep
            draft.lockstep.append((mapping, block))
        for local, axis in rule.tensors:
            key = f"{name}.{local}"
            reduce_mod = block if isinstance(module, nn.modules.conv._ConvNd) else 0
            draft.entries.append(_Entry(canonical.get(key, key), axis, mapping, reduce_mod))
    return draft


def _units(draft: _Draft) -> torch.Tensor:
    """(units, k) root indices of each unit: one root per unit, or the lock-step orbits of the
    roots inside the conv groups of a grouped layer that reads them (ordered by conv group)."""
    if not draft.lockstep:
        return torch.arange(draft.size)[:, None]
    orbit_sets = []
    units = None
    for mapping, block in draft.lockstep:
        positions = mapping.single_positions("a grouped layer")
        if bool((positions < 0).any()):
            raise _Unsupported("a grouped layer reads only part of the units")
        order = torch.argsort((positions % block) * (int(positions.max()) + 1) + positions // block)
        orbits = order.reshape(block, -1)  # row u: the roots at within-group position u, by conv group
        orbit_sets.append({tuple(sorted(row.tolist())) for row in orbits})
        units = orbits if units is None else units
    if any(other != orbit_sets[0] for other in orbit_sets[1:]):
        raise _Unsupported("grouped layers with incompatible group structures read the same units")
    return units


def _member_index(entry: _Entry, units: torch.Tensor) -> torch.Tensor | None:
    """(size, block) positions of ``units`` along the entry's axis, or None if it covers none."""
    index = entry.mapping.rows(units)
    if index is None:
        return None
    if entry.reduce_mod:  # the grouped conv's weight sees the within-group position only
        index = index % entry.reduce_mod
        if bool((index != index[:, :1]).any()):
            raise _Unsupported(f"units reach {entry.key} at different positions within their conv groups")
        index = index[:, :1]
    if index.unique().numel() != index.numel():
        raise _Unsupported(f"one position of {entry.key} (axis {entry.axis}) belongs to several units")
    return index


def _groups_from_draft(draft: _Draft, order: dict[str, int]) -> list[PermutationGroup]:
    """Split a draft into permutation groups: one per set of units read by the same tensors."""
    missing = [m for m in draft.depthwise_in if m not in draft.out_modules]
    if missing:
        raise _Unsupported(f"depthwise convolution {missing[0]} is coupled to its input only")
    units = _units(draft)
    if draft.partitions and units.shape[1] > 1:
        raise _Unsupported("units are read by one grouped layer and written by another")
    # Units covered by exactly the same tensors (and conv groups) can be permuted among themselves.
    covered = torch.stack([e.mapping.covered[units].any(1) for e in draft.entries], dim=1)  # (units, entries)
    blocks = torch.stack([p[units[:, 0]] for p in draft.partitions], 1) if draft.partitions else covered[:, :0]
    signature: dict[tuple, list[int]] = defaultdict(list)
    for u, (row, block) in enumerate(zip(covered.tolist(), blocks.tolist())):
        signature[(tuple(row), tuple(block))].append(u)
    drafts = []
    for (row, _), cell in sorted(signature.items(), key=lambda kv: kv[1][0]):
        cell_units = units[cell]
        producers = [n for n, mp in draft.producers if bool(mp.covered[cell_units].any())]
        consumers = [n for n, mp in draft.consumers if bool(mp.covered[cell_units].any())]
        if len(cell) < 2 or not consumers:
            continue
        merged: dict[tuple[str, int], torch.Tensor] = {}
        for i in (i for i, hit in enumerate(row) if hit):
            entry = draft.entries[i]
            index = _member_index(entry, cell_units)
            if index is None:
                continue
            key = (entry.key, entry.axis)
            if key in merged and not torch.equal(merged[key], index):
                raise _Unsupported(f"{entry.key} (axis {entry.axis}) is reached along two different paths")
            merged[key] = index
        base = _first_in_module_order(producers or [k for k, _ in merged], order)
        drafts.append((base, cell, tuple(merged.items()), producers, consumers))
    bases = [d[0] for d in drafts]
    groups = []
    for base, cell, merged, producers, consumers in drafts:
        name = base if bases.count(base) == 1 else f"{base}[{cell[0]}:{cell[-1] + 1}]"
        groups.append(
            PermutationGroup(
                name=name,
                size=len(cell),
                members=tuple(AxisMember(k, a, idx) for (k, a), idx in merged),
                producers=tuple(dict.fromkeys(producers)),
                consumers=tuple(dict.fromkeys(consumers)),
            )
        )
    return groups
