"""Parameterisations shared by the linear and convolutional regressable layers.

Each family stores its weights as matrices over the layer's *design* (input features, or unfolded
patches for a convolution), so a linear layer and a convolution of the same family share the fit and
the constraint; only the way the matrix meets the input differs (``fusion.layers.linear`` / ``.conv``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .regression import RegressableMixin, SemiOrthogonal, check_rank, procrustes, reduced_rank

__all__ = ["LowRankFamily", "ProcrustesFamily"]


def _uniform_(tensor: torch.Tensor, fan_in: int) -> None:
    """torch's default Linear/Conv initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(tensor, -bound, bound)


class LowRankFamily(RegressableMixin, nn.Module):
    """``W = up @ down`` with ``down`` (rank, design) and ``up`` (out, rank); fitted by reduced-rank regression."""

    def __init__(self, design_size: int, out_size: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.rank = check_rank(rank, design_size, out_size, type(self).__name__)
        self.down = nn.Parameter(torch.empty(rank, design_size))
        self.up = nn.Parameter(torch.empty(out_size, rank))
        self.bias = nn.Parameter(torch.empty(out_size)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random factors (torch's default initialisation of each factor as a layer); zero-mean bias."""
        _uniform_(self.down, self.down.shape[1])
        _uniform_(self.up, self.rank)
        if self.bias is not None:
            _uniform_(self.bias, self.down.shape[1])

    def weight_matrix(self) -> torch.Tensor:
        return self.up @ self.down

    def _solve(self, sxx: torch.Tensor, sxy: torch.Tensor, ridge: float, rcond: float) -> torch.Tensor:
        up, down = reduced_rank(sxx, sxy, self.rank, ridge, rcond)
        with torch.no_grad():
            self.up.copy_(up.to(self.up))
            self.down.copy_(down.to(self.down))
        return up @ down


class ProcrustesFamily(RegressableMixin, nn.Module):
    """``W = s R`` with ``R`` semi-orthogonal (:class:`SemiOrthogonal`) and ``s > 0`` (fixed to 1 without ``scale``).

    Fitted by orthogonal Procrustes; the bias is the optional shift.
    """

    def __init__(self, design_size: int, out_size: int, bias: bool = True, scale: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.rotation = SemiOrthogonal(out_size, design_size)
        self.log_scale = nn.Parameter(torch.zeros(())) if scale else None
        self.bias = nn.Parameter(torch.zeros(out_size)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A random semi-orthogonal ``R``, ``s = 1``, zero shift."""
        self.rotation.reset_parameters()
        if self.log_scale is not None:
            self.log_scale.zero_()
        if self.bias is not None:
            self.bias.zero_()

    def weight_matrix(self) -> torch.Tensor:
        rotation = self.rotation()
        return rotation if self.log_scale is None else self.log_scale.exp() * rotation

    def _solve(self, sxx: torch.Tensor, sxy: torch.Tensor, ridge: float, rcond: float) -> torch.Tensor:
        rotation, factor = procrustes(sxx, sxy, self.scale)
        factor = factor.clamp_min(torch.finfo(factor.dtype).tiny)
        self.rotation.set_(rotation)
        if self.log_scale is not None:
            with torch.no_grad():
                self.log_scale.copy_(factor.log().to(self.log_scale))
        return factor * rotation
