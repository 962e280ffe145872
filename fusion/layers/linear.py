"""Regressable linear layers: dense (:class:`RegressableLinear`), low-rank and Procrustes (rotation) maps.

They map features along ``channel_dim`` (the last dimension by default, like ``nn.Linear``; 1 for
``(N, C, H, W)`` feature maps, where the layer acts as a 1x1 convolution).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerError
from .families import LowRankFamily, ProcrustesFamily
from .regression import RegressableMixin, least_squares

__all__ = ["LowRankLinear", "ProcrustesLinear", "RegressableLinear"]


class _Features:
    """Rows of a linear layer: the features along ``channel_dim``, every other position a sample."""

    in_features: int
    out_features: int
    channel_dim: int

    def _along(self, x: torch.Tensor, size: int, what: str) -> torch.Tensor:
        if x.dim() == 0 or not -x.dim() <= self.channel_dim < x.dim() or x.shape[self.channel_dim] != size:
            raise LayerError(
                f"{type(self).__name__}: {what} of shape {tuple(x.shape)} lack {size} features along dim {self.channel_dim}"
            )
        return torch.movedim(x, self.channel_dim, -1)

    def design(self, x: torch.Tensor) -> torch.Tensor:
        return self._along(x, self.in_features, "inputs").reshape(-1, self.in_features)

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        return self._along(y, self.out_features, "targets").reshape(-1, self.out_features)

    def _map(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.channel_dim in (-1, x.dim() - 1):
            return fn(x)
        return torch.movedim(fn(torch.movedim(x, self.channel_dim, -1)), -1, self.channel_dim)


class RegressableLinear(_Features, RegressableMixin, nn.Linear):
    """``nn.Linear`` with a least-squares :meth:`fit` (and features along ``channel_dim``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 channel_dim: int = -1) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(x, super().forward)

    def weight_matrix(self) -> torch.Tensor:
        return self.weight

    def _solve(self, sxx: torch.Tensor, sxy: torch.Tensor, ridge: float, rcond: float) -> torch.Tensor:
        weight = least_squares(sxx, sxy, ridge, rcond)
        with torch.no_grad():
            self.weight.copy_(weight.to(self.weight))
        return weight

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", channel_dim={self.channel_dim}" if self.channel_dim != -1 else "")


class LowRankLinear(_Features, LowRankFamily):
    """``y = up(down(x))``: a linear layer of rank ``rank`` (``rank * (in + out)`` weights) made of two ``nn.Linear``.

    Args:
        in_features, out_features: sizes as for ``nn.Linear``.
        rank: the inner width, in ``1..min(in_features, out_features)``.
        bias: learn an additive bias.
        channel_dim: the feature dimension of the inputs (last by default).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *, channel_dim: int = -1) -> None:
        super().__init__()
        self._check_rank(rank, in_features, out_features)
        self.in_features, self.out_features, self.channel_dim = in_features, out_features, channel_dim
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(x, lambda v: self.up(self.down(v)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}, channel_dim={self.channel_dim}"


class ProcrustesLinear(_Features, ProcrustesFamily):
    """``y = s R x + b`` with ``R`` semi-orthogonal: a rotation (reflection) with optional scale ``s`` and shift ``b``.

    With unequal widths ``R`` has orthonormal rows (``out < in``) or columns (``out > in``). Training
    keeps ``R`` on the constraint set (see :class:`~fusion.layers.regression.SemiOrthogonal`).

    Args:
        in_features, out_features: sizes as for ``nn.Linear``.
        bias: learn the shift ``b``.
        scale: learn the scale ``s`` (fixed to 1 when False).
        channel_dim: the feature dimension of the inputs (last by default).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale: bool = True, *,
                 channel_dim: int = -1) -> None:
        super().__init__(in_features, out_features, bias, scale)
        self.in_features, self.out_features, self.channel_dim = in_features, out_features, channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(x, lambda v: F.linear(v, self.weight_matrix(), self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"scale={self.scale}, channel_dim={self.channel_dim}"
