"""Neuron Transplantation: fuse an ensemble by concatenating its members and pruning the result.

Öz, Debus, Götz (KIT), "Model Fusion via Neuron Transplantation", ECML PKDD 2024. The ``N``
members are concatenated into one ``N`` times wider model computing the ensemble mean
(:func:`~fusion.fuse.concat.concat_models`), then every hidden group is pruned back to the members'
width by keeping its largest units (torch-pruning's group magnitude importance): the small units of
one member are sacrificed to make room for the large units of the others. A short fine-tuning
recovers most of the damage done by the pruning, and the fused model has exactly the members'
architecture.

Pruning is done by torch-pruning (``DependencyGraph.get_pruning_group(...).prune()``) for plain
channel groups. Where torch-pruning would not restore the members' architecture it is done through
the permutation spec instead, by keeping whole structures:

* attention heads: torch-pruning's MultiheadAttention pruner removes embedding channels inside
  every head (``head_dim`` would shrink); whole heads are kept instead, and the embedding stream
  around the attention is pruned through the spec as well;
* grouped convolutions and GroupNorm: torch-pruning keeps all ``N * g`` groups and thins each one;
  whole conv/norm groups are kept instead (``g`` of ``N * g``), so that ``groups`` returns to ``g``;
* parameters outside modules (class tokens, positional embeddings), whose owners keep width
  attributes torch-pruning does not update.

Schedules: ``"all"`` concatenates all members at once (the paper's default), ``"iterative"`` fuses two
at a time from left to right, ``"hierarchical"`` fuses pairs in a binary tree. Members that are exact
copies of each other are merged before concatenating (their units are duplicates), so fusing a model
with itself returns that model.

Example:
    >>> fused = fuse_ensemble([model_a, model_b], example_inputs, finetune_data=train_loader, finetune_epochs=1)
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .._lazy import tp
from ..align.nested import nesting
from ..checks import describe_shapes, eval_mode, main_output, model_device, move_inputs, run_model
from ..errors import DataError, EnsembleError, TraceError
from ..progress import tqdm
from ..spec import PermutationGroup, PermutationSpec, permutation_spec
from ..spec.hf_layers import customized_pruners
from .concat import (
    BLOCKS,
    GROUPS,
    UNITS,
    Concatenation,
    ConcatError,
    GroupLink,
    block_index,
    build_concatenation,
    check_members,
    probe_forward,
    read_block,
)
from .layers import owner_of, resize_tensors, restore_norm, set_submodule

tp_function = tp.pruner.function

__all__ = ["SCHEDULES", "fuse_ensemble", "fuse_hierarchical", "fuse_iterative"]

log = logging.getLogger(__name__)

#: Accepted ``schedule`` values of :func:`fuse_ensemble`.
SCHEDULES = ("all", "iterative", "hierarchical")

#: ``importance(group) -> scores``: a torch-pruning ``Group`` of a layer's output channels in, one score
#: per channel out (a larger score keeps the channel).
Importance = Callable[[Any], torch.Tensor]

_TP_SAFE_TYPES = {
    tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.DEPTHWISE_CONV, tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.BN, tp.ops.OPTYPE.IN,
    tp.ops.OPTYPE.LN, tp.ops.OPTYPE.PRELU, tp.ops.OPTYPE.EMBED, tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.CONCAT,
    tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.SLICE,
    tp.ops.OPTYPE.OUTPUT,
}


def fuse_ensemble(
    models: Sequence[nn.Module],
    example_inputs: Any,
    importance: str | Importance = "l2",
    finetune_data: Any = None,
    finetune_epochs: int = 0,
    lr: float = 1e-3,
    progress: bool = True,
    spec: PermutationSpec | None = None,
    schedule: str = "all",
    keep: float | int | None = None,
    data: Any = None,
) -> nn.Module:
    """Fuse an ensemble into one model of the members' architecture by Neuron Transplantation.

    One-shot (without fine-tuning) the fused model loses accuracy: the pruned units of every member
    are gone. BatchNorm networks suffer most because their running statistics describe the
    members, not the transplanted mixture; pass ``data`` to re-estimate them (on two small CNNs with
    BatchNorm trained on the digits, one-shot accuracy rises from 12-25% to about 50%). Fine-tuning
    (``finetune_epochs``) is the method's second half and recovers the members' accuracy or better.

    Args:
        models: two or more trained models of one architecture, device and dtype (not modified).
        example_inputs: inputs the models accept (tensor, tuple or dict), e.g. a batch ``(B, C, H, W)``;
            used to trace the models.
        importance: ``"l2"`` or ``"l1"`` (torch-pruning's ``GroupMagnitudeImportance(p=2 or 1)``), or a
            callable ``importance(group) -> scores`` that receives the torch-pruning ``Group`` of a
            producing layer's output channels (all of them) and returns one score per channel; the
            largest-scoring units are kept. Attention heads, which have no torch-pruning group, are
            ranked by the L2 norm of their weights (L1 with ``"l1"``).
        finetune_data: labelled batches to fine-tune the fused model on (DataLoader or iterable).
        finetune_epochs: epochs of fine-tuning (0: none).
        lr: fine-tuning learning rate (Adam).
        progress: show progress bars.
        spec: the members' :class:`~fusion.PermutationSpec` (computed from ``models[0]`` if None).
        schedule: ``"all"`` (concatenate every member at once), ``"iterative"`` (fuse two at a time,
            left to right) or ``"hierarchical"`` (fuse pairs in a binary tree); in every case each
            original member weighs ``1/N`` in the concatenated output layer. Fine-tuning runs once, at the end.
        keep: how many units of each hidden layer survive the pruning (the paper's pruning ratio is
            ``1 - keep / N``): None (default) keeps the members' width, so the fused model has their
            architecture; a float is a fraction of the members' width (``0.5``: half as wide, ``1.5``:
            wider, at most ``N``); an int is the width of every hidden layer (``keep=1`` is one unit:
            use ``1.0`` for the members' width). Widths other than the members' need ``schedule="all"``
            and layers torch-pruning prunes (convolutions, linear layers, norms; not attention heads or
            grouped convolutions).
        data: batches (DataLoader or iterable, labels ignored) on which the fused model's BatchNorm
            statistics are re-estimated after transplanting (skipped for models without BatchNorm);
            also the fine-tuning data when ``finetune_data`` is None.

    Returns:
        The fused model: an instance of the members' class whose state dict loads into member 0
        with ``strict=True`` (with ``keep``: of the requested widths), in member 0's train/eval mode.

    Raises:
        EnsembleError: fewer than two models, an unknown ``importance`` or ``schedule``, a bad ``keep``.
        ArchitectureMismatchError, DeviceMismatchError, NonFiniteWeightsError: invalid ensemble.
        ConcatError: the architecture cannot be concatenated or pruned back exactly.
        DataError: ``finetune_epochs > 0`` without ``finetune_data``.
    """
    models = check_members(models, "fuse_ensemble")
    scorer = _importance(importance)
    if schedule not in SCHEDULES:
        raise EnsembleError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise DataError(f"finetune_epochs must be a non-negative integer, got {finetune_epochs!r}")
    finetune_data = data if finetune_data is None else finetune_data
    if finetune_epochs > 0 and finetune_data is None:
        raise DataError(f"finetune_epochs={finetune_epochs} needs finetune_data (or data)")
    _check_keep(keep, len(models), schedule)
    inputs = move_inputs(example_inputs, model_device(models[0]))
    if spec is None:
        spec = permutation_spec(models[0], inputs)

    def step(parts: list[_Part]) -> _Part:
        return _transplant(parts, inputs, spec, scorer, progress, keep)

    fused = _reduce([_Part(m, 1) for m in models], step, schedule).model
    if data is not None:
        from .norm import reset_bn_stats

        fused = reset_bn_stats(fused, data, progress=progress, inplace=True)
    if finetune_epochs > 0:
        from .finetune import finetune

        fused = finetune(fused, finetune_data, epochs=finetune_epochs, lr=lr, progress=progress, inplace=True)
    return fused


def fuse_iterative(models: Sequence[nn.Module], example_inputs: Any, **kwargs: Any) -> nn.Module:
    """:func:`fuse_ensemble` with ``schedule="iterative"``: fuse ``models[0]`` and ``models[1]``, then the
    result with ``models[2]``, and so on (each original member keeps weight ``1/N``)."""
    return fuse_ensemble(models, example_inputs, schedule="iterative", **kwargs)


def fuse_hierarchical(models: Sequence[nn.Module], example_inputs: Any, **kwargs: Any) -> nn.Module:
    """:func:`fuse_ensemble` with ``schedule="hierarchical"``: fuse neighbouring pairs, then pairs of the
    results, up a binary tree (an odd model out moves up a level unchanged)."""
    return fuse_ensemble(models, example_inputs, schedule="hierarchical", **kwargs)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Part:
    """A model standing for ``count`` original members."""

    model: nn.Module
    count: int


def _reduce(parts: list[_Part], step: Callable[[list[_Part]], _Part], schedule: str) -> _Part:
    if schedule == "all":
        return step(parts)
    if schedule == "iterative":
        result = parts[0]
        for part in parts[1:]:
            result = step([result, part])
        return result
    while len(parts) > 1:
        parts = [step(parts[i:i + 2]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def _deduplicate(parts: list[_Part]) -> list[_Part]:
    """Merge parts whose models are bitwise identical (their count adds up)."""
    unique: list[tuple[dict[str, torch.Tensor], _Part]] = []
    for part in parts:
        state = part.model.state_dict()
        for k, (other, kept) in enumerate(unique):
            if all(torch.equal(state[key], other[key]) for key in state):
                unique[k] = (other, _Part(kept.model, kept.count + part.count))
                break
        else:
            unique.append((state, part))
    return [part for _, part in unique]


def _check_keep(keep: float | int | None, count: int, schedule: str) -> None:
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not keep > 0:
        raise EnsembleError(f"keep must be a positive fraction of the members' width (float) or a width (int), "
                            f"got {keep!r}")
    if isinstance(keep, float) and keep > count:
        raise EnsembleError(f"keep={keep} asks for more than the {count} members' units together (at most {count}.0)")
    if schedule != "all":
        raise EnsembleError(f"keep needs schedule='all' (the {schedule!r} schedule fuses intermediate models of "
                            f"the members' width)")


def _transplant(parts: list[_Part], inputs: Any, spec: PermutationSpec, scorer: _Scorer, progress: bool,
                keep: float | int | None = None) -> _Part:
    """One transplantation: concatenate ``parts`` (weighted by their counts) and prune back."""
    total = sum(p.count for p in parts)
    parts = _deduplicate(parts) if keep is None else parts  # with keep, duplicates may fill the extra width
    if len(parts) == 1:
        log.info("all %d models are identical; nothing to transplant", total)
        return _Part(copy.deepcopy(parts[0].model), total)
    concat = build_concatenation([p.model for p in parts], inputs, spec=spec, weights=[p.count / total for p in parts])
    return _Part(_retie(_prune_to_members(concat, inputs, scorer, progress, keep), parts[0].model), total)


def _retie(fused: nn.Module, member: nn.Module) -> nn.Module:
    """Tie again what the members tie (the concatenation unties a tied output embedding): the fused model
    has the members' architecture, its output layer reading the transplanted input embedding."""
    first: dict[int, str] = {}
    tied = {key: first.setdefault(id(t), key) for key, t in member.state_dict(keep_vars=True).items()}
    params = dict(fused.named_parameters(remove_duplicate=False))
    for key in tied:
        if tied[key] != key and key in params and tied[key] in params and params[key] is not params[tied[key]]:
            _, module, local = owner_of(fused, key)
            module._parameters[local] = params[tied[key]]
    member_config, config = getattr(member, "config", None), getattr(fused, "config", None)
    if hasattr(member_config, "tie_word_embeddings") and config is not None:
        config.tie_word_embeddings = member_config.tie_word_embeddings
    return fused


# --------------------------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scorer:
    """Scores units: torch-pruning importance for layer outputs, weight norms for everything else.

    ``magnitude``: ``importance`` is torch-pruning's default ``GroupMagnitudeImportance(p)``, which the
    pruner computes from the members' blocks of the concatenated model (:class:`_BlockMagnitude`).
    """

    importance: Importance
    p: int
    magnitude: bool = False


def _importance(importance: str | Importance) -> _Scorer:
    if callable(importance):
        return _Scorer(importance, 2)
    if importance in ("l1", "l2"):
        p = 1 if importance == "l1" else 2
        return _Scorer(tp.importance.GroupMagnitudeImportance(p=p), p, magnitude=True)
    raise EnsembleError(f"unknown importance {importance!r}; expected 'l1', 'l2' or a callable(group) -> scores")


class _BlockMagnitude(tp.importance.GroupMagnitudeImportance):
    """torch-pruning's ``GroupMagnitudeImportance(p)`` of a concatenated model, read from its members' blocks.

    The score of a channel is a sum of ``|w|^p`` over the weights that the group's layers hold for
    it (torch-pruning: conv/linear rows and columns, BatchNorm and LayerNorm weights; mean over
    those layers; normalised to mean 1). In the concatenated model every entry outside the members'
    blocks is zero, so each layer's per-channel sums are computed block by block (``N`` member-sized
    blocks instead of the ``N^2``-sized wide tensor); layers, indices, reduction and normalisation
    are torch-pruning's, so the scores are the same up to float summation order. Any other
    configuration falls back to torch-pruning's own computation.
    """

    def __init__(self, p: int, concat: Concatenation):
        super().__init__(p=p)
        self.concat = concat
        self.keys: dict[int, str] = {}
        for key, tensor in concat.model.state_dict(keep_vars=True).items():
            self.keys.setdefault(id(tensor), key)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        if self.group_reduction != "mean" or self.normalizer != "mean" or self.bias:
            return super().__call__(group)
        scores, roots = [], []
        for item in group.items:
            dep, idxs = item
            local = self._local(dep.layer, dep.pruning_fn, idxs)
            if local is not None:
                scores.append(local)
                roots.append(item.root_idxs)
        if not scores:
            return None
        return self._normalize(self._reduce(scores, roots), self.normalizer)

    def _local(self, layer: nn.Module, fn: Any, idxs: Any) -> torch.Tensor | None:
        """One layer's ``|w|^p`` per channel of ``idxs`` (torch-pruning's rule), or None where it counts none."""
        if not isinstance(layer, tuple(self.target_types)):
            return None
        transposed = bool(getattr(layer, "transposed", False))
        if fn in (tp_function.prune_conv_out_channels, tp_function.prune_linear_out_channels):
            return self._channel_sums(layer.weight, 1 if transposed else 0)[idxs]
        if fn in (tp_function.prune_conv_in_channels, tp_function.prune_linear_in_channels):
            local = self._channel_sums(layer.weight, 0 if transposed else 1)
            if fn == tp_function.prune_conv_in_channels and layer.groups not in (layer.in_channels, 1):
                local = local.repeat(layer.groups)
            return local[idxs]
        if fn == tp_function.prune_batchnorm_out_channels and layer.affine or \
                fn == tp_function.prune_layernorm_out_channels and layer.elementwise_affine:
            return layer.weight.data[idxs].abs().pow(self.p)
        return None

    def _channel_sums(self, weight: torch.Tensor, axis: int) -> torch.Tensor:
        """``|weight|^p`` summed over every axis but ``axis``, from the members' blocks of ``weight``."""
        dims = [d for d in range(weight.dim()) if d != axis]
        key = self.keys.get(id(weight))
        positions = self.concat.positions
        if key is None or not any((key, a) in positions for a in range(weight.dim())):
            return weight.data.abs().pow(self.p).sum(dims)
        sums = torch.zeros(weight.shape[axis], dtype=weight.dtype, device=weight.device)
        for k in range(self.concat.num_members):
            index = block_index(positions, key, weight.dim(), k)
            values = read_block(weight.data, index).abs().pow_(self.p).sum(dims)
            if isinstance(index[axis], slice):
                sums[index[axis]] += values
            else:
                sums.index_add_(0, index[axis].to(sums.device), values)
        return sums


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
