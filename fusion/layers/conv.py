"""Regressable 2-d convolutions: dense (:class:`RegressableConv2d`), low-rank and Procrustes kernels.

A convolution is a linear map of its input patches: the fit unfolds the inputs into
``(N * positions, in_channels * kh * kw)`` rows (``torch.nn.functional.unfold`` with the layer's stride,
padding and dilation) and pairs them with the targets' ``(N * positions, out_channels)`` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..errors import LayerError
from .families import LowRankFamily, ProcrustesFamily
from .regression import RegressableMixin, least_squares

__all__ = ["LowRankConv2d", "ProcrustesConv2d", "RegressableConv2d"]

IntPair = int | tuple[int, int]


class _Patches:
    """Rows of a convolution: unfolded input patches, paired with the output pixels."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != channels:
            raise LayerError(f"{type(self).__name__}: {what} must be (N, {channels}, H, W), got {tuple(x.shape)}")

    def _padding(self) -> tuple[int, int]:
        if isinstance(self.padding, str):
            if self.padding != "valid":
                raise LayerError(f"{type(self).__name__}: fitting needs numeric padding, got padding={self.padding!r}")
            return (0, 0)
        return self.padding

    def design(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, self.in_channels, "inputs")
        if getattr(self, "groups", 1) != 1 or getattr(self, "padding_mode", "zeros") != "zeros":
            raise LayerError(f"{type(self).__name__}: fitting supports groups=1 and padding_mode='zeros' only")
        patches = F.unfold(x, self.kernel_size, self.dilation, self._padding(), self.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, self.out_channels, "targets")
        return y.movedim(1, -1).reshape(-1, self.out_channels)

    def _geometry(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair, padding: IntPair,
                  dilation: IntPair) -> int:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        return in_channels * self.kernel_size[0] * self.kernel_size[1]

    def _conv(self, x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernel = matrix.reshape(matrix.shape[0], self.in_channels, *self.kernel_size)
        return F.conv2d(x, kernel, bias, self.stride, self.padding, self.dilation)

    def _conv_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, " \
               f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}"


class RegressableConv2d(_Patches, RegressableMixin, nn.Conv2d):
    """``nn.Conv2d`` with a least-squares :meth:`fit` over its input patches (``groups=1``)."""

    def weight_matrix(self) -> torch.Tensor:
        return self.weight.flatten(1)

    def _solve(self, sxx: torch.Tensor, sxy: torch.Tensor, ridge: float, rcond: float) -> torch.Tensor:
        weight = least_squares(sxx, sxy, ridge, rcond)
        with torch.no_grad():
            self.weight.copy_(weight.reshape(self.weight.shape).to(self.weight))
        return weight


class LowRankConv2d(_Patches, LowRankFamily):
    """A ``kh x kw`` convolution to ``rank`` channels followed by a 1x1 convolution to ``out_channels``.

    The kernel, seen as an ``(out, in * kh * kw)`` matrix, has rank ``rank``; it costs
    ``rank * (in * kh * kw + out)`` weights. Arguments as for ``nn.Conv2d`` plus ``rank``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, rank: int, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, bias: bool = True) -> None:
        super().__init__()
        design = self._geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)
        self._check_rank(rank, design, out_channels)
        self.down = nn.Conv2d(in_channels, rank, self.kernel_size, self.stride, self.padding, self.dilation, bias=False)
        self.up = nn.Conv2d(rank, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, rank={self.rank}"


class ProcrustesConv2d(_Patches, ProcrustesFamily):
    """A convolution whose ``(out, in * kh * kw)`` kernel matrix is ``s R`` with ``R`` semi-orthogonal.

    Optional shift (``bias``) and scale (``scale``); arguments otherwise as for ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, bias: bool = True, scale: bool = True) -> None:
        design = self._geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)
        ProcrustesFamily.__init__(self, design, out_channels, bias, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight_matrix(), self.bias)

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, scale={self.scale}"
