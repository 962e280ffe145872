"""Linear layers of transformer libraries that torch-pruning does not know.

Hugging Face's ``Conv1D`` (GPT-2, GPT-2-derived models) is a linear layer whose weight is stored
transposed, ``(in, out)``, and applied with ``addmm``; torch-pruning would see its weight as a
loose parameter of an element-wise op. A customized pruner makes the graph treat it as a linear
layer, and :func:`transposed_linear_rule` says which axes move. Recognised from the module itself
(class name ``Conv1D`` with ``nf`` output features matching the weight's second axis), so the
library is never imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._lazy import tp


def is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D``: a linear layer storing its weight as ``(in, out)``."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and isinstance(nf, int) and weight.shape[1] == nf)


def linear_axes(module: nn.Module) -> tuple[int, int] | None:
    """``(out axis, in axis)`` of a linear-like module's weight, or None for other modules."""
    if isinstance(module, nn.Linear):
        return 0, 1
    if is_transposed_linear(module):
        return 1, 0
    return None


def transposed_linear_rule(module: nn.Module, is_out: bool) -> list[tuple[str, int]]:
    """The (local tensor, axis) pairs a permutation of a ``Conv1D``'s outputs (or inputs) moves."""
    if is_out:
        return [("weight", 1)] + ([("bias", 0)] if getattr(module, "bias", None) is not None else [])
    return [("weight", 0)]


class _TransposedLinearGraph(tp.pruner.function.BasePruningFunc):
    """Channel counts of a ``Conv1D`` for torch-pruning's graph (fusion never prunes)."""

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("fusion permutes, it never prunes")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("fusion permutes, it never prunes")

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.weight.shape[1])

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.weight.shape[0])


def customized_pruners(model: nn.Module) -> dict[type, Any]:
    """torch-pruning pruners for the transposed linear classes used in ``model``."""
    return {type(m): _TransposedLinearGraph() for m in model.modules() if is_transposed_linear(m)}
