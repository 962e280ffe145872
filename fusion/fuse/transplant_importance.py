"""How Neuron Transplantation ranks the units of a concatenated model (``importance`` of
:func:`~fusion.fuse.transplant.fuse_ensemble`).

``"l1"``/``"l2"`` is torch-pruning's ``GroupMagnitudeImportance(p)``, computed from the members'
blocks of the concatenated model (:class:`_BlockMagnitude`: ``N`` member-sized blocks instead of the
``N^2``-sized wide tensor, the same scores); a callable receives the torch-pruning ``Group`` of a
layer's output channels and returns one score per channel. :class:`_Scorer` carries the choice to
the pruner (:mod:`fusion.fuse.transplant_prune`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._lazy import tp
from ..errors import EnsembleError
from .concat import Concatenation
from .concat_groups import block_index, read_block

tp_function = tp.pruner.function

#: ``importance(group) -> scores``: a torch-pruning ``Group`` of a layer's output channels in, one score
#: per channel out (a larger score keeps the channel).
Importance = Callable[[Any], torch.Tensor]


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
