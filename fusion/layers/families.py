"""Parameterisations shared by the linear and convolutional regressable layers.

Each family stores its weights as matrices over the layer's *design* (input features, or unfolded
patches for a convolution), so a linear layer and a convolution of the same family share the fit and
the constraint; only the way the matrix meets the input differs (``fusion.layers.linear`` / ``.conv``).
"""

from __future__ import annotations

import torch
from torch import nn

from .regression import RegressableMixin, SemiOrthogonal, check_rank, procrustes, reduced_rank

__all__ = ["LowRankFamily", "ProcrustesFamily"]


class LowRankFamily(RegressableMixin, nn.Module):
    """``W = up @ down`` with two ordinary layers ``down`` (design -> rank) and ``up`` (rank -> out, with the bias).

    Subclasses build ``down`` and ``up`` (``nn.Linear`` or ``nn.Conv2d``, so that tools that read layer
    types, such as torch-pruning and :func:`fusion.permutation_spec`, see two plain layers joined by a
    rank-wide hidden dimension). Fitted by reduced-rank regression.
    """

    down: nn.Linear | nn.Conv2d
    up: nn.Linear | nn.Conv2d

    def _check_rank(self, rank: int, design_size: int, out_size: int) -> int:
        self.rank = check_rank(rank, design_size, out_size, type(self).__name__)
        return self.rank

    @property
    def bias(self) -> nn.Parameter | None:  # type: ignore[override]
        return self.up.bias

    def reset_parameters(self) -> None:
        """torch's default initialisation of both factors."""
        self.down.reset_parameters()
        self.up.reset_parameters()

    def weight_matrix(self) -> torch.Tensor:
        return self.up.weight.flatten(1) @ self.down.weight.flatten(1)

    def _solve(self, sxx: torch.Tensor, sxy: torch.Tensor, ridge: float, rcond: float) -> torch.Tensor:
        up, down = reduced_rank(sxx, sxy, self.rank, ridge, rcond)
        with torch.no_grad():
            self.up.weight.copy_(up.reshape(self.up.weight.shape).to(self.up.weight))
            self.down.weight.copy_(down.reshape(self.down.weight.shape).to(self.down.weight))
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
