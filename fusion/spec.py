"""Permutation specs: which weight axes must be permuted together to keep a network's function.

A hidden unit (neuron, channel, embedding feature) can be moved to another position without
changing what the network computes, provided every tensor that reads or writes that unit is
re-indexed the same way. :func:`permutation_spec` derives these coupled sets automatically from
torch-pruning's ``DependencyGraph`` (Fang et al., "DepGraph: Towards Any Structural Pruning",
CVPR 2023), which already tracks channel coupling across residual adds, concatenations, splits,
normalisation layers, depthwise/grouped convolutions, attention and parameters outside modules.

Each :class:`PermutationGroup` is a free permutation of ``size`` units. For each tensor axis it
touches, an :class:`AxisMember` stores ``index`` of shape ``(size, block)``: the positions along
that axis occupied by each unit. ``block`` is 1 for a plain channel, ``h*w`` when a flatten turns a
channel into a block of features (VGG's classifier), and ``groups`` for a grouped convolution's
producer, whose channels move in lock-step inside every conv group. A permutation ``perm`` of a
group (``perm[i]`` = the unit of the source model that lands at position ``i``) moves the values at
``index[perm[i]]`` to ``index[i]`` on every member at once.

Where the graph is unsure, the group is left out and listed in :attr:`PermutationSpec.skipped`
with a reason: a refused group costs coverage, a wrong one costs the user's model. By default
every group is also checked on the real model (a random permutation must leave the output of
``example_inputs`` unchanged) and groups that fail are found by bisection and refused.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .checks import describe_shapes, eval_mode, move_inputs, run_model
from .errors import PermutationError, SpecMismatchError, TraceError
from .guard import memory_guard

__all__ = [
    "AxisMember",
    "PermutationGroup",
    "PermutationSpec",
    "SkippedGroup",
    "permutation_spec",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class AxisMember:
    """One tensor axis moved by a permutation group.

    Attributes:
        name: state-dict key of the parameter or buffer.
        axis: the axis of that tensor which the group permutes.
        index: LongTensor of shape ``(size, block)``; row ``u`` lists the positions along ``axis``
            that unit ``u`` of the group occupies.
    """

    name: str
    axis: int
    index: torch.Tensor

    @property
    def block(self) -> int:
        """How many positions along the axis one unit occupies."""
        return int(self.index.shape[1])

    def __iter__(self) -> Iterator[Any]:
        # Allows ``for name, axis in group.members``.
        return iter((self.name, self.axis))

    def __repr__(self) -> str:
        return f"AxisMember({self.name!r}, axis={self.axis}, block={self.block})"


@dataclass(frozen=True, eq=False)
class PermutationGroup:
    """A set of tensor axes that one permutation must move together.

    Attributes:
        name: stable name, derived from the first layer (in module order) producing the units.
        size: number of units (the length of a permutation of this group).
        members: every ``(name, axis)`` the group moves, with its unit-to-position index.
        producers: module (or parameter) names whose outputs are these units.
        consumers: module names that read these units as inputs.
        kind: ``"channels"`` for ordinary hidden units, ``"heads"``, ``"head_qk"`` or ``"head_v"``
            for attention groups.
    """

    name: str
    size: int
    members: tuple[AxisMember, ...]
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    kind: str = "channels"

    @property
    def axes(self) -> tuple[tuple[str, int], ...]:
        """The ``(parameter or buffer name, axis)`` pairs moved by this group."""
        return tuple((m.name, m.axis) for m in self.members)

    def __repr__(self) -> str:
        return f"PermutationGroup({self.name!r}, size={self.size}, members={len(self.members)})"


@dataclass(frozen=True)
class SkippedGroup:
    """Units that are left unpermuted, and why."""

    name: str
    size: int
    reason: str


@dataclass(frozen=True, eq=False)
class PermutationSpec:
    """The permutation symmetries of one architecture.

    Computed once per architecture by :func:`permutation_spec` and valid for every model whose
    state dict has the same keys and shapes.

    Attributes:
        groups: the permutation groups, in the model's module order.
        skipped: hidden-unit sets that could not be permuted safely, each with a reason.
        shapes: state-dict key -> shape of the architecture the spec was built for.
        architecture: class name of the model.
    """

    groups: tuple[PermutationGroup, ...]
    skipped: tuple[SkippedGroup, ...]
    shapes: dict[str, tuple[int, ...]]
    architecture: str
    _by_name: dict[str, PermutationGroup] = field(default_factory=dict, repr=False)
    _by_tensor: dict[str, list[tuple[PermutationGroup, AxisMember]]] = field(default_factory=dict, repr=False)

    _position: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for i, group in enumerate(self.groups):
            self._position[group.name] = i
            self._by_name[group.name] = group
            for member in group.members:
                self._by_tensor.setdefault(member.name, []).append((group, member))

    @property
    def names(self) -> list[str]:
        """Group names in order."""
        return [g.name for g in self.groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[PermutationGroup]:
        return iter(self.groups)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> PermutationGroup:
        return self.group(name)

    def group(self, name: str) -> PermutationGroup:
        """The group called ``name``; raises :class:`PermutationError` listing close names if absent."""
        try:
            return self._by_name[name]
        except KeyError:
            close = [n for n in self._by_name if name.split(".")[0] in n][:5]
            hint = f"; similar names: {close}" if close else ""
            raise PermutationError(f"no permutation group named {name!r} in this spec{hint}") from None

    def position(self, name: str) -> int:
        """Index of group ``name`` in :attr:`groups` (permutations are applied in this order)."""
        return self._position[name]

    def members_of(self, tensor_name: str) -> list[tuple[PermutationGroup, AxisMember]]:
        """Every ``(group, member)`` that moves an axis of the tensor called ``tensor_name``."""
        return list(self._by_tensor.get(tensor_name, ()))

    @property
    def permuted_tensors(self) -> list[str]:
        """State-dict keys of all tensors that some group moves."""
        return list(self._by_tensor)

    def group_of_layer(self, layer: str) -> PermutationGroup:
        """The group whose units are the outputs of module ``layer``.

        Raises:
            PermutationError: if ``layer`` produces no permutable group (unknown name, the model's
                output layer, or a refused group).
        """
        for group in self.groups:
            if layer in group.producers and group.kind == "channels":
                return group
        for skipped in self.skipped:
            if skipped.name == layer:
                raise PermutationError(f"layer {layer!r} produces no permutable units: {skipped.reason}")
        known = sorted({p for g in self.groups for p in g.producers})
        if not any(key.startswith(layer + ".") for key in self.shapes):
            raise PermutationError(
                f"no layer named {layer!r} in {self.architecture}; permutable layers: {known[:8]}..."
            )
        raise PermutationError(
            f"layer {layer!r} produces no permutable group (it may be the output layer or only consume "
            f"permuted units); permutable layers include {known[:8]}"
        )

    def check_state_dict(self, state: dict[str, torch.Tensor], argument: str = "model") -> None:
        """Raise :class:`SpecMismatchError` unless ``state`` has this spec's keys and shapes."""
        for key, shape in self.shapes.items():
            if key not in state:
                raise SpecMismatchError(
                    f"{argument} has no tensor {key!r}: the spec was built for another architecture "
                    f"({self.architecture})"
                )
            if tuple(state[key].shape) != shape:
                raise SpecMismatchError(
                    f"{argument}: {key!r} has shape {tuple(state[key].shape)} but the spec expects {shape} "
                    f"(built for {self.architecture}); build a spec for this model"
                )
        extra = [k for k in state if k not in self.shapes]
        if extra:
            raise SpecMismatchError(
                f"{argument} has tensor {extra[0]!r} unknown to the spec (built for {self.architecture})"
            )

    def check_model(self, model: nn.Module, argument: str = "model") -> None:
        """Raise :class:`SpecMismatchError` unless ``model`` has this spec's architecture."""
        self.check_state_dict(model.state_dict(), argument)

    def summary(self) -> str:
        """A human-readable table of groups and skipped units."""
        lines = [f"PermutationSpec for {self.architecture}: {len(self.groups)} groups, {len(self.skipped)} skipped"]
        width = max([len(g.name) for g in self.groups] + [10])
        lines.append(f"  {'group':<{width}}  {'size':>6}  {'kind':<9} tensors")
        for g in self.groups:
            lines.append(f"  {g.name:<{width}}  {g.size:>6}  {g.kind:<9} {len(g.members)}")
        for s in self.skipped:
            lines.append(f"  skipped {s.name} ({s.size}): {s.reason}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Axis rules per layer type
# --------------------------------------------------------------------------------------------


class _Unsupported(Exception):
    """A construct for which no permutation rule is known (the group is refused)."""


@dataclass
class _AxisRule:
    """Which local tensors and axes a channel operation on one module moves."""

    tensors: list[tuple[str, int]]
    lockstep: int = 1  # >1: input of a grouped conv / GroupNorm with that many conv groups


_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _present(module: nn.Module, names: Sequence[str], axis: int) -> list[tuple[str, int]]:
    return [(n, axis) for n in names if getattr(module, n, None) is not None]


def _axis_rule(module: nn.Module, is_out: bool, name: str) -> _AxisRule:
    """The tensors/axes moved when the units on ``module``'s output (or input) are permuted."""
    if isinstance(module, nn.Linear):
        return _AxisRule(_present(module, ["weight", "bias"], 0) if is_out else [("weight", 1)])
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise _Unsupported(f"grouped transposed convolution {name}")
        return _AxisRule([("weight", 1)] + _present(module, ["bias"], 0) if is_out else [("weight", 0)])
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if is_out:
            return _AxisRule(_present(module, ["weight", "bias"], 0))
        if module.groups == 1:
            return _AxisRule([("weight", 1)])
        if depthwise:
            return _AxisRule([], lockstep=0)  # moved by the out-channel rule of the same conv
        return _AxisRule([("weight", 1)], lockstep=module.groups)
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return _AxisRule(_present(module, _NORM_TENSORS, 0))
    if isinstance(module, nn.GroupNorm):
        return _AxisRule(_present(module, ["weight", "bias"], 0), lockstep=module.num_groups)
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise _Unsupported(f"LayerNorm {name} normalises over {tuple(module.normalized_shape)}")
        return _AxisRule(_present(module, ["weight", "bias"], 0))
    if isinstance(module, nn.PReLU):
        return _AxisRule([("weight", 0)] if module.num_parameters > 1 else [])
    if isinstance(module, nn.Embedding):
        if not is_out:
            raise _Unsupported(f"embedding {name} has no input channels")
        return _AxisRule([("weight", 1)])
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            raise _Unsupported(f"attention {name} with separate key/value dimensions")
        tensors = [("in_proj_weight", 1), ("out_proj.weight", 0)]
        if module.out_proj.bias is not None:
            tensors.append(("out_proj.bias", 0))
        return _AxisRule(tensors)
    if isinstance(module, nn.RNNBase):
        if is_out:
            raise _Unsupported(f"hidden units of recurrent layer {name}")
        return _AxisRule([(n, 1) for n in ("weight_ih_l0", "weight_ih_l0_reverse") if hasattr(module, n)])
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise _Unsupported(f"no permutation rule for {type(module).__name__} {name}")
    return _AxisRule([])


# --------------------------------------------------------------------------------------------
# From torch-pruning groups to permutation groups
# --------------------------------------------------------------------------------------------

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
            if isinstance(module, _LAYERS):
                draft.producers.append((name, mapping))
        elif isinstance(module, _LAYERS):
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


def _attention_groups(name: str, mha: nn.MultiheadAttention, canonical: dict[str, str]) -> list[PermutationGroup]:
    """Per-head groups of ``nn.MultiheadAttention``: q/k rows share a permutation, v rows move
    with the output projection's columns, and whole heads can be reordered."""
    if not mha._qkv_same_embed_dim:
        return []
    e, h = mha.embed_dim, mha.num_heads
    d = e // h

    def key(local: str) -> str:
        full = f"{name}.{local}"
        return canonical.get(full, full)

    def rows(offsets: Sequence[int], units: torch.Tensor) -> torch.Tensor:
        return torch.stack([units + o for o in offsets], dim=-1).reshape(len(units), -1)

    groups = []
    has_bias = mha.in_proj_bias is not None
    for head in range(h):
        base = torch.arange(head * d, (head + 1) * d)
        qk = rows([0, e], base)
        v = rows([2 * e], base)
        qk_members = [AxisMember(key("in_proj_weight"), 0, qk)]
        v_members = [AxisMember(key("in_proj_weight"), 0, v), AxisMember(key("out_proj.weight"), 1, base[:, None])]
        if has_bias:
            qk_members.append(AxisMember(key("in_proj_bias"), 0, qk))
            v_members.append(AxisMember(key("in_proj_bias"), 0, v))
        if mha.bias_k is not None:
            qk_members.append(AxisMember(key("bias_k"), 2, base[:, None]))
            v_members.append(AxisMember(key("bias_v"), 2, base[:, None]))
        producers = (name,)
        groups.append(PermutationGroup(f"{name}.head{head}.qk", d, tuple(qk_members), producers, producers, "head_qk"))
        groups.append(PermutationGroup(f"{name}.head{head}.v", d, tuple(v_members), producers, producers, "head_v"))
    if h > 1:
        heads = torch.arange(h)[:, None] * d + torch.arange(d)[None, :]  # (h, d)
        qkv = torch.cat([heads, heads + e, heads + 2 * e], dim=1)
        head_members = [AxisMember(key("in_proj_weight"), 0, qkv), AxisMember(key("out_proj.weight"), 1, heads)]
        if has_bias:
            head_members.append(AxisMember(key("in_proj_bias"), 0, qkv))
        if mha.bias_k is not None:
            head_members += [AxisMember(key("bias_k"), 2, heads), AxisMember(key("bias_v"), 2, heads)]
        groups.append(PermutationGroup(f"{name}.heads", h, tuple(head_members), (name,), (name,), "heads"))
    return groups


# --------------------------------------------------------------------------------------------
# Building and verifying a spec
# --------------------------------------------------------------------------------------------


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Map every state-dict key to the first key that shares its tensor (tied weights)."""
    first: dict[int, str] = {}
    canonical = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        canonical[key] = first.setdefault(id(tensor), key)
    return canonical


def _resolve_ignored(model: nn.Module, ignored_layers: Sequence[str | nn.Module] | None) -> list[nn.Module]:
    modules = dict(model.named_modules())
    resolved = []
    for layer in ignored_layers or ():
        if isinstance(layer, str):
            if layer not in modules:
                raise PermutationError(f"ignored_layers names {layer!r}, which is not a module of the model")
            resolved.append(modules[layer])
        elif isinstance(layer, nn.Module):
            resolved.append(layer)
        else:
            raise TypeError(f"ignored_layers entries must be module names or modules, got {type(layer).__name__}")
    return resolved


def _build_graph(work: nn.Module, example_inputs: Any, unwrapped: Any) -> tp.DependencyGraph:
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(
                work, example_inputs, verbose=False, unwrapped_parameters=unwrapped
            )
    except Exception as exc:  # torch-pruning raises plain exceptions of many kinds
        with torch.no_grad(), eval_mode(work):
            run_model(work, example_inputs)  # raises ExampleInputError if the inputs are at fault
        raise TraceError(
            f"torch-pruning could not trace {type(work).__name__} on example_inputs of shape "
            f"{describe_shapes(example_inputs)}: {type(exc).__name__}: {exc}"
        ) from exc


def _output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def relative_difference(out_a: Any, out_b: Any) -> float:
    """max |a - b| / max |a| over all floating tensors of two (nested) model outputs."""
    tensors_a, tensors_b = _output_tensors(out_a), _output_tensors(out_b)
    if len(tensors_a) != len(tensors_b) or not tensors_a:
        raise ValueError("the two outputs do not have the same structure of floating tensors")
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(tensors_a, tensors_b))
    scale = max(float(a.double().abs().max()) for a in tensors_a)
    return diff / scale if scale > 0 else diff


class _Verifier:
    """Checks on the real model that random permutations of some groups keep its output.

    Takes ownership of ``model`` (a private copy). Runs in the model's own dtype: a wrong
    coupling changes a random network's output by orders of magnitude more than rounding
    (relative difference >= 1e-2 in practice, against <= 1e-5 from summation order in float32),
    so the tolerance is 1e-4 for float32 (1e-9 for float64, 2e-2 for half precision). Permuted
    tensors are passed through ``torch.func.functional_call``, so the model's weights are never
    rewritten.
    """

    TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}

    def __init__(self, model: nn.Module, example_inputs: Any, seed: int):
        from .checks import model_dtype
        from .permute import permute_state_dict, random_permutation

        self._permute_state_dict = permute_state_dict
        self._random_permutation = random_permutation
        self.seed = seed
        self.model, self.inputs = model.eval(), example_inputs
        self.tol = self.TOLERANCE.get(model_dtype(model), 1e-4)
        self.reference = self._forward({})
        self.state = model.state_dict()

    def _forward(self, tensors: dict[str, torch.Tensor]) -> Any:
        with torch.no_grad():
            return torch.func.functional_call(self.model, tensors, _as_args(self.inputs), _as_kwargs(self.inputs),
                                              strict=False)

    def difference(self, groups: Sequence[PermutationGroup]) -> float:
        perms = self._random_permutation(groups, seed=self.seed)
        new_state = self._permute_state_dict(self.state, groups, perms)
        changed = {k: v for k, v in new_state.items() if v is not self.state[k]}
        return relative_difference(self.reference, self._forward(changed))

    def failing(self, groups: Sequence[PermutationGroup]) -> dict[str, float]:
        """Groups whose random permutation changes the output (found by bisection)."""
        if not groups:
            return {}
        diff = self.difference(groups)
        if diff <= self.tol:
            return {}
        if len(groups) == 1:
            return {groups[0].name: diff}
        half = len(groups) // 2
        return {**self.failing(groups[:half]), **self.failing(groups[half:])}


def _as_args(inputs: Any) -> tuple:
    if isinstance(inputs, dict):
        return ()
    return tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)


def _as_kwargs(inputs: Any) -> dict:
    return dict(inputs) if isinstance(inputs, dict) else {}


def _first_in_module_order(names: Sequence[str], order: dict[str, int]) -> str:
    def rank(name: str) -> tuple[int, str]:
        module = name.rsplit(".", 1)[0] if name not in order else name
        return (order.get(module, order.get(name, len(order))), name)

    return min(names, key=rank)


def permutation_spec(
    model: nn.Module,
    example_inputs: Any,
    ignored_layers: Sequence[str | nn.Module] | None = None,
    unwrapped_parameters: dict[str, int] | None = None,
    attention_heads: bool = True,
    verify: bool = True,
    seed: int = 0,
) -> PermutationSpec:
    """Derive the permutation symmetries of ``model`` from torch-pruning's dependency graph.

    Args:
        model: any module torch-pruning can trace. It is not modified (the graph is built on a
            deep copy, so not even its train/eval mode changes).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs that
            the model accepts, e.g. ``torch.randn(1, 3, 64, 64)``.
        ignored_layers: module names (or modules) whose output units must stay in place.
        unwrapped_parameters: ``{parameter name: axis}`` for parameters outside standard modules
            (class tokens, positional embeddings) whose channel axis is not their last
            non-singleton axis (torch-pruning's guess).
        attention_heads: also add per-head groups for ``nn.MultiheadAttention`` (q/k dims, v dims,
            whole heads).
        verify: check every group on the model itself: a random permutation must leave the
            output on ``example_inputs`` unchanged (relative difference <= 1e-4 in float32);
            failing groups are found by bisection and moved to :attr:`PermutationSpec.skipped`.
        seed: seed of the verification permutations.

    Returns:
        The :class:`PermutationSpec`, reusable for every model of this architecture.

    Raises:
        ExampleInputError: the model rejects ``example_inputs``.
        TraceError: torch-pruning cannot trace the model.

    Example:
        >>> spec = permutation_spec(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        >>> perms = random_permutation(spec, seed=0)
        >>> same_function = permute(model, perms, spec)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # torch-pruning only reads the model (it traces with temporary hooks, in eval mode) and the
    # verification passes permuted tensors functionally, so no copy is needed: the train/eval
    # mode of every submodule is restored on exit.
    with eval_mode(model):
        return _build_spec(model, example_inputs, ignored_layers, unwrapped_parameters, attention_heads, verify, seed)


def _build_spec(
    work: nn.Module,
    example_inputs: Any,
    ignored_layers: Sequence[str | nn.Module] | None,
    unwrapped_parameters: dict[str, int] | None,
    attention_heads: bool,
    verify: bool,
    seed: int,
) -> PermutationSpec:
    from .checks import model_device

    model = work
    example_inputs = move_inputs(example_inputs, model_device(work))
    canonical = _canonical_names(work)
    ignored = _resolve_ignored(work, ignored_layers)
    params = dict(work.named_parameters())
    unwrapped = None
    if unwrapped_parameters:
        missing = [n for n in unwrapped_parameters if n not in params]
        if missing:
            raise PermutationError(f"unwrapped_parameters names {missing[0]!r}, which is not a parameter of the model")
        unwrapped = [(params[n], axis) for n, axis in unwrapped_parameters.items()]
    graph = _build_graph(work, example_inputs, unwrapped)

    order = {name: i for i, (name, _) in enumerate(work.named_modules())}
    order.update({name: len(order) + i for i, name in enumerate(canonical)})
    groups: list[PermutationGroup] = []
    skipped: list[SkippedGroup] = []
    ignored_names = {graph._module2name.get(m, "") for m in ignored}
    with memory_guard(f"building the dependency groups of {type(model).__name__}"):
        tp_groups = list(graph.get_all_groups(root_module_types=(nn.Module,)))
    for tp_group in tp_groups:
        try:
            draft = _draft_group(graph, tp_group, canonical)
        except _Unsupported as exc:
            root = tp_group[0].dep.target
            name = graph._module2name.get(root.module, graph._param_to_name.get(root.module, str(root)))
            skipped.append(SkippedGroup(name, len(tp_group[0].idxs), str(exc)))
            continue
        if not draft.entries:
            continue
        name = _first_in_module_order([n for n, _ in draft.producers] or [e.key for e in draft.entries], order)
        if draft.out_modules & ignored_names:
            skipped.append(SkippedGroup(name, draft.size, "ignored by the caller (ignored_layers)"))
        elif draft.reaches_output:
            skipped.append(SkippedGroup(name, draft.size, "its units are the model's output"))
        elif not draft.consumers:
            skipped.append(SkippedGroup(name, draft.size, "no layer reads these units"))
        else:
            try:
                groups.extend(_groups_from_draft(draft, order))
            except _Unsupported as exc:
                skipped.append(SkippedGroup(name, draft.size, str(exc)))

    if attention_heads:
        for name, module in work.named_modules():
            if isinstance(module, nn.MultiheadAttention) and module in graph.module2node:
                groups.extend(_attention_groups(name, module, canonical))
            elif isinstance(module, nn.MultiheadAttention):
                skipped.append(SkippedGroup(name, module.num_heads, "attention layer was not traced"))

    names = defaultdict(int)
    for g in groups:
        names[g.name] += 1
    groups = _unique_names(groups, names)
    # Module order; an attention layer's whole-head group comes before its within-head groups,
    # which act on the head positions after heads are reordered (the groups overlap).
    rank = {"channels": 0, "heads": 1, "head_qk": 2, "head_v": 2}
    groups.sort(key=lambda g: (order.get(g.name.split("[")[0] if g.kind == "channels" else g.producers[0], len(order)),
                               rank[g.kind], g.name))

    if verify and groups:
        failing = _Verifier(work, example_inputs, seed).failing(groups)
        if failing:
            log.warning("refusing %d permutation group(s) that change the output: %s", len(failing), sorted(failing))
        skipped.extend(
            SkippedGroup(g.name, g.size, f"a random permutation changed the output (relative difference "
                         f"{failing[g.name]:.2e}); the dependency graph is unsure here")
            for g in groups if g.name in failing
        )
        groups = [g for g in groups if g.name not in failing]

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return PermutationSpec(tuple(groups), tuple(skipped), shapes, type(model).__name__)


def _unique_names(groups: list[PermutationGroup], counts: dict[str, int]) -> list[PermutationGroup]:
    seen: dict[str, int] = defaultdict(int)
    out = []
    for g in groups:
        if counts[g.name] > 1:
            seen[g.name] += 1
            g = PermutationGroup(f"{g.name}#{seen[g.name]}", g.size, g.members, g.producers, g.consumers, g.kind)
        out.append(g)
    return out
