"""Pruning a concatenated model back to the members' architecture (second step of Neuron Transplantation).

:class:`_Pruner` scores the units of every permutation group of the wide model, keeps the best ones
(whole attention heads and whole conv/norm groups where the structure asks for it; ``keep`` other
widths) and removes the rest: through torch-pruning's dependency graph for plain channel groups,
through the permutation spec where torch-pruning would not restore the members' architecture
(attention heads, grouped convolutions, GroupNorm, parameters outside modules).
:func:`_prune_to_members` runs it and checks the result's shapes.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .._lazy import tp
from ..align.nested import nesting
from ..checks import describe_shapes, eval_mode, main_output, run_model
from ..errors import ConcatError, EnsembleError, TraceError
from ..progress import tqdm
from ..spec import PermutationGroup, PermutationSpec
from ..spec.hf_layers import customized_pruners
from .concat import Concatenation
from .concat_groups import BLOCKS, GROUPS, UNITS, GroupLink
from .concat_skeleton import probe_forward
from .layers import resize_tensors, restore_norm, set_submodule
from .transplant_importance import _BlockMagnitude, _Scorer

log = logging.getLogger(__name__)

_TP_SAFE_TYPES = {
    tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.DEPTHWISE_CONV, tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.BN, tp.ops.OPTYPE.IN,
    tp.ops.OPTYPE.LN, tp.ops.OPTYPE.PRELU, tp.ops.OPTYPE.EMBED, tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.CONCAT,
    tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.SLICE,
    tp.ops.OPTYPE.OUTPUT,
}

_PRUNE_OUT = ((_ConvNd, tp.prune_conv_out_channels), (nn.Linear, tp.prune_linear_out_channels),
              (nn.Embedding, tp.prune_embedding_out_channels))


def _out_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, _ConvNd) and module.transposed else (1 if isinstance(module, nn.Embedding) else 0)


class _Pruner:
    """Decides which units of a concatenated model survive and removes the others."""

    def __init__(self, concat: Concatenation, inputs: Any, scorer: _Scorer, keep: float | int | None = None):
        self.concat, self.scorer, self.keep = concat, scorer, keep
        self.importance = _BlockMagnitude(scorer.p, concat) if scorer.magnitude else scorer.importance
        self.model = concat.model
        self.modules = dict(self.model.named_modules())
        self.graph = _dependency_graph(self.model, inputs, concat.member_spec) \
            if _traceable_attention(self.modules, concat.member_spec) else None
        self.state = self.model.state_dict()
        self._scores: dict[str, torch.Tensor | None] = {}
        self.links = {link.group.name: link for link in concat.links}
        self.nested = set(nesting(concat.spec).parent)  # groups inside a unit of another (attention)

    # ---- scores -------------------------------------------------------------------------------

    def _producer(self, group: PermutationGroup) -> tuple[str, nn.Module, Any, torch.Tensor] | None:
        """A layer producing the group's units: (name, module, torch-pruning function, index on its outputs)."""
        members = {(m.name, m.axis): m for m in group.members}
        for name in group.producers:
            module = self.modules.get(name)
            fn = next((f for cls, f in _PRUNE_OUT if isinstance(module, cls)), None)
            member = members.get((f"{name}.weight", _out_axis(module))) if fn is not None else None
            if member is not None and self.graph is not None and module in self.graph.module2node:
                return name, module, fn, member.index
        return None

    def _layer_scores(self, name: str, module: nn.Module, fn: Any) -> torch.Tensor | None:
        """Importance of every output channel of layer ``name`` (cached)."""
        if name not in self._scores:
            count = int(module.weight.shape[_out_axis(module)])
            group = self.graph.get_pruning_group(module, fn, list(range(count)))
            scores = self.importance(group)
            if scores is not None:
                scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
                if scores.numel() != count or not bool(torch.isfinite(scores).all()):
                    raise EnsembleError(f"importance returned {tuple(scores.shape)} scores for layer {name!r} with "
                                        f"{count} output channels; expected {count} finite scores")
                scores = scores / scores.abs().mean().clamp_min(1e-12)
            self._scores[name] = scores
        return self._scores[name]

    def position_scores(self, group: PermutationGroup) -> torch.Tensor:
        """``(size, block)`` scores of the group's positions (on the producing layer's output axis)."""
        producer = self._producer(group)
        if producer is not None:
            name, module, fn, index = producer
            scores = self._layer_scores(name, module, fn)
            if scores is not None:
                return scores[index]
        return self._magnitude(group)

    def _magnitude(self, group: PermutationGroup) -> torch.Tensor:
        """Group p-norm^p of each position over all of the group's tensors (torch-pruning's rule, done
        through the spec), normalised to mean 1."""
        block = max(m.block for m in group.members)
        total = torch.zeros(group.size, block)
        for member in group.members:
            tensor = self.state[member.name].detach().float()
            picked = tensor.index_select(member.axis, member.index.reshape(-1).to(tensor.device))
            values = picked.movedim(member.axis, 0).reshape(group.size, member.block, -1).abs().pow(self.scorer.p)
            values = values.sum(-1).cpu()
            total += values if member.block == block else values.sum(1, keepdim=True) / block
        return total / total.mean().clamp_min(1e-12)

    # ---- selection ----------------------------------------------------------------------------

    def width(self, link: GroupLink) -> int:
        """Units of ``link``'s group that survive: the members' count, or what ``keep`` asks for (plain units)."""
        if self.keep is None or link.pattern != UNITS or link.group.kind != "channels":
            return link.keep
        width = self.keep if isinstance(self.keep, int) else max(1, round(self.keep * link.keep))
        if width > link.group.size:
            raise EnsembleError(f"keep={self.keep} asks for {width} units of {link.group.name!r}, but the "
                                f"concatenated members have {link.group.size}")
        return width

    def select(self) -> dict[str, torch.Tensor]:
        """Group name -> boolean mask over its units (``"units"``, ``"groups"``) or index columns
        (``"blocks"``) telling what is kept."""
        keep: dict[str, torch.Tensor] = {}
        conv_groups: dict[str, torch.Tensor] = {}
        for link in self.concat.links:
            if link.pattern == UNITS:
                keep[link.group.name] = _top(self.position_scores(link.group).sum(1), self.width(link))
            elif link.pattern == BLOCKS:
                keep[link.group.name] = self._select_blocks(link, conv_groups)
        families: dict[tuple[str, ...], list[GroupLink]] = defaultdict(list)
        for link in self.concat.links:
            if link.pattern == GROUPS:
                families[link.family].append(link)
        for members in families.values():
            keep.update(self._select_family(members, conv_groups))
        return keep

    def _grouped_conv(self, name: str) -> _ConvNd | None:
        module = self.modules.get(name)
        if isinstance(module, _ConvNd) and 1 < module.groups < module.out_channels:
            return module
        return None

    def _conv_group_of(self, group: PermutationGroup) -> tuple[str, int] | None:
        """(grouped conv, conv group index) for a group of a grouped convolution's output channels."""
        for name in group.producers:
            conv = self._grouped_conv(name)
            if conv is not None:
                index = next((m.index for m in group.members if m.name == f"{name}.weight" and m.axis == 0), None)
                if index is not None:
                    return name, int(index.min()) // (conv.out_channels // conv.groups)
        return None

    def _select_blocks(self, link: GroupLink, conv_groups: dict[str, torch.Tensor]) -> torch.Tensor:
        # Lock-step units of grouped convolutions / GroupNorm: keep whole conv (norm) groups, i.e.
        # index columns, scored together with the output channels of each conv group.
        columns = self.position_scores(link.group).sum(0)
        for other in self.concat.links:
            owner = self._conv_group_of(other.group) if other.pattern == GROUPS else None
            if owner is not None and owner[0] in link.group.consumers and owner[1] < len(columns):
                columns[owner[1]] += self.position_scores(other.group).sum()
        kept = _top(columns, link.keep)
        for name in link.group.consumers:
            conv = self._grouped_conv(name)
            if conv is not None and conv.groups == len(columns):
                conv_groups[name] = kept
        return kept

    def _select_family(self, links: list[GroupLink], conv_groups: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        decided = {}
        for link in links:
            owner = self._conv_group_of(link.group)
            if owner is not None and owner[0] in conv_groups:  # follows its conv group
                decided[link.group.name] = conv_groups[owner[0]][owner[1]]
            elif link.group.name in self.nested:  # inside a head (or a GQA block): whole heads are chosen there
                decided[link.group.name] = torch.tensor(True)
        undecided = [link for link in links if link.group.name not in decided]
        if undecided:  # no structure decides: keep the family's best groups
            totals = torch.stack([self.position_scores(link.group).sum() for link in undecided])
            kept = _top(totals, links[0].keep)
            decided.update({link.group.name: kept[i] for i, link in enumerate(undecided)})
        return {name: value.expand(self.links[name].group.size).clone() for name, value in decided.items()}

    # ---- removal ------------------------------------------------------------------------------

    def dropped_positions(self, link: GroupLink, kept: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
        """Positions removed from each widened tensor axis of ``link``'s group."""
        dropped = {}
        for member in link.group.members:
            if member.axis not in self.concat.widened.get(member.name, ()):
                continue
            if link.pattern == BLOCKS:
                if member.block != len(kept):
                    continue
                positions = member.index[:, ~kept]
            else:
                positions = member.index[~kept]
            dropped[(member.name, member.axis)] = positions.reshape(-1)
        return dropped

    def torch_pruning_group(self, link: GroupLink, kept: torch.Tensor) -> Any:
        """The torch-pruning group removing ``link``'s dropped units, or None where torch-pruning would not
        restore the members' architecture (attention, GroupNorm, grouped convolutions, parameters
        outside modules): those are pruned through the spec."""
        producer = self._producer(link.group)
        if link.pattern != UNITS or link.group.kind != "channels" or producer is None:
            return None
        _, module, fn, index = producer
        group = self.graph.get_pruning_group(module, fn, index[~kept].reshape(-1).tolist())
        if all(dep.target.type in _TP_SAFE_TYPES and _tp_safe_module(dep.target.module) for dep, _ in group):
            return group
        return None


def _tp_safe_module(module: Any) -> bool:
    return not (isinstance(module, _ConvNd) and 1 < module.groups < module.out_channels)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` largest scores (ties: the earlier position wins)."""
    order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def _traceable_attention(modules: dict[str, nn.Module], spec: PermutationSpec) -> bool:
    """Whether torch-pruning's graph may be traced: attention only as ``nn.MultiheadAttention``.

    Attention built from separate or fused projections (Hugging Face, timm) was laid out by
    :mod:`fusion.spec.heads` with the graph cut at the attention; a whole-model trace would walk
    softmax, rotary embeddings and caches (and runs away on LLaMA-style decoders). There every
    group is scored and pruned through the spec (torch-pruning's magnitude rule, same result).
    """
    for group in spec.groups:
        if group.kind != "channels" and not all(isinstance(modules.get(p), nn.MultiheadAttention)
                                                for p in group.producers):
            return False
    return True


def _dependency_graph(model: nn.Module, inputs: Any, spec: PermutationSpec) -> tp.DependencyGraph:
    params = dict(model.named_parameters())
    unwrapped = [(params[m.name], m.axis) for g in spec.groups for m in g.members
                 if m.name in params and m.name in g.producers] or None
    try:
        with warnings.catch_warnings(), torch.enable_grad(), eval_mode(model):
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(  # traced on the main output (ModelOutput logits)
                model, inputs, forward_fn=run_model, output_transform=main_output, verbose=False,
                unwrapped_parameters=unwrapped, customized_pruners=customized_pruners(model))
    except Exception as exc:  # torch-pruning raises many kinds of exceptions
        raise TraceError(f"torch-pruning could not trace the concatenated {type(model).__name__} on inputs of shape "
                         f"{describe_shapes(inputs)}: {type(exc).__name__}: {exc}") from exc


def _prune_to_members(concat: Concatenation, inputs: Any, scorer: _Scorer, progress: bool,
                      keep: float | int | None = None) -> nn.Module:
    """Prune the concatenated model back to the members' architecture, or to the widths ``keep`` asks for (in
    place), and return it."""
    model = concat.model
    for name, original in concat.layer_norms.items():  # the members' LayerNorms, at the wide width
        set_submodule(model, name, restore_norm(original, model.get_submodule(name)))
    pruner = _Pruner(concat, inputs, scorer, keep)
    widths = {link.group.name: pruner.width(link) for link in concat.links}
    keep = pruner.select()
    links = {link.group.name: link for link in concat.links}
    by_axis: dict[tuple[str, int], list[str]] = defaultdict(list)
    for link in concat.links:
        for member in link.group.members:
            by_axis[(member.name, member.axis)].append(link.group.name)
    through_tp = {name for name, link in links.items() if pruner.torch_pruning_group(link, keep[name]) is not None}
    # A group sharing a tensor axis with a group pruned through the spec is pruned through the spec
    # too, so that torch-pruning never shifts positions the spec still refers to.
    changed = True
    while changed:
        changed = False
        for names in by_axis.values():
            if not through_tp.issuperset(names) and through_tp.intersection(names):
                through_tp.difference_update(names)
                changed = True
    resized = [name for name, link in links.items() if widths[name] != link.keep]
    if any(name not in through_tp for name in resized):
        bad = next(name for name in resized if name not in through_tp)
        raise EnsembleError(f"keep: group {bad!r} can only be pruned back to the members' width (torch-pruning does "
                            f"not prune it: attention heads, grouped convolutions, parameters outside modules)")
    log.debug("pruning %d group(s) with torch-pruning and %d through the spec: %s", len(through_tp),
              len(links) - len(through_tp), sorted(set(links) - through_tp))
    dropped: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
    for name in tqdm(list(links), desc="transplant", disable=not progress, leave=False):
        if name in through_tp:  # rebuilt now: earlier prunes may have moved torch-pruning's index mappings
            pruner.torch_pruning_group(links[name], keep[name]).prune()
        else:
            for key_axis, positions in pruner.dropped_positions(links[name], keep[name]).items():
                dropped[key_axis].append(positions)
    _remove_positions(model, dropped)
    probe_forward(model, inputs)
    if resized:
        log.info("transplanted to widths %s (members: %s)", {n: widths[n] for n in resized},
                 {n: links[n].keep for n in resized})
    else:
        _check_member_shapes(model, concat.member_spec)
    return model


def _remove_positions(model: nn.Module, dropped: dict[tuple[str, int], list[torch.Tensor]]) -> None:
    state = model.state_dict()
    axes: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for (key, axis), positions in dropped.items():
        axes[key].append((axis, torch.cat(positions)))
    new = {}
    for key, removals in axes.items():
        tensor = state[key].detach()
        for axis, positions in removals:
            mask = torch.ones(tensor.shape[axis], dtype=torch.bool)
            mask[positions] = False
            tensor = tensor.index_select(axis, mask.nonzero().reshape(-1).to(tensor.device))
        new[key] = tensor.clone()
    try:
        resize_tensors(model, new)
    except ValueError as exc:
        raise ConcatError(f"cannot prune the concatenated model back: {exc}") from exc


def _check_member_shapes(model: nn.Module, spec: PermutationSpec) -> None:
    state = model.state_dict()
    missing = [key for key in spec.shapes if key not in state]
    if missing:
        raise ConcatError(f"pruning did not restore the members' architecture: {missing[0]!r} is missing")
    for key, tensor in state.items():
        expected = spec.shapes.get(key)
        if expected is None or tuple(tensor.shape) != expected:
            raise ConcatError(f"pruning did not restore the members' architecture: {key!r} has shape "
                              f"{tuple(tensor.shape)}, the members have {expected}")
