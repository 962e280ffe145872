"""The result record of an alignment."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..spec import PermutationSpec

__all__ = ["Alignment"]


@dataclass(frozen=True, eq=False)
class Alignment:
    """Model B aligned to model A.

    Attributes:
        model: a copy of model B moved into model A's basis (permuted; for unequal widths with
            optimal transport, mapped onto A's widths through the transport maps).
        perms: group name -> LongTensor; ``perms[g][i]`` is B's unit that lands at A's unit ``i``.
            Empty when the widths differ.
        cost: the final objective (sum of matched inner products of all weights for weight
            matching, of matched correlations for activation matching, of transported
            similarities for optimal transport). Higher is better.
        history: the objective after each sweep (weight matching) or group (other methods).
        method: ``"weight"``, ``"activation"`` or ``"ot"``.
        spec: the permutation spec of model A used for the alignment.
        transport: group name -> (size_a, size_b) transport plan, for ``method="ot"``.
        fallback: groups that had no activation to match and were matched on weights instead.
    """

    model: nn.Module
    perms: dict[str, torch.Tensor]
    cost: float
    history: list[float]
    method: str
    spec: PermutationSpec
    transport: dict[str, torch.Tensor] = field(default_factory=dict)
    fallback: tuple[str, ...] = ()

    @property
    def iterations(self) -> int:
        """Number of sweeps (weight matching) or solved groups."""
        return len(self.history)
