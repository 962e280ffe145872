"""Streaming first and second moments of paired feature matrices (sufficient statistics for regression).

:class:`CrossMoments` accumulates, batch by batch, the means and centered scatter matrices
``Xc^T Xc``, ``Yc^T Yc`` and ``Xc^T Yc`` of two feature matrices with the same rows. Memory is
``O(dx^2 + dy^2 + dx*dy)``, independent of the number of samples; batches are merged with the
parallel-variance update of Chan, Golub & LeVeque (1979) in float64, which avoids the cancellation of
the naive ``X^T X - n mu mu^T``. Least-squares stitching layers (:mod:`fusion.inspect.stitch`) and
representation similarity (:mod:`fusion.analysis.similarity`) are both computed from these statistics.
"""

from __future__ import annotations

import torch

from .checks import describe_shapes
from .errors import DataError

__all__ = ["CrossMoments"]


class CrossMoments:
    """Running means and centered (cross-)scatter matrices of paired samples ``x`` (dx wide), ``y`` (dy wide).

    Args:
        dtype: accumulation dtype (float64 by default).
        with_yy: also accumulate ``Yc^T Yc`` (not needed for plain regression).
        diagonal: keep only the diagonals of ``Xc^T Xc`` and ``Yc^T Yc`` (per-feature sums of
            squared deviations, ``(dx,)`` and ``(dy,)``), for pairwise statistics that need no
            within-set covariance (``Xc^T Yc`` stays full).

    Attributes:
        count: number of samples seen.
        mean_x: ``(dx,)``; mean_y: ``(dy,)``.
        sxx: ``(dx, dx)`` = ``Xc^T Xc``; syy: ``(dy, dy)`` = ``Yc^T Yc`` (or None); sxy: ``(dx, dy)`` = ``Xc^T Yc``.
    """

    def __init__(self, dtype: torch.dtype = torch.float64, with_yy: bool = True, diagonal: bool = False) -> None:
        self.dtype = dtype
        self.with_yy = with_yy
        self.diagonal = diagonal
        self.count = 0
        self.mean_x: torch.Tensor | None = None
        self.mean_y: torch.Tensor | None = None
        self.sxx: torch.Tensor | None = None
        self.syy: torch.Tensor | None = None
        self.sxy: torch.Tensor | None = None

    @property
    def dims(self) -> tuple[int, int]:
        """``(dx, dy)``; raises :class:`DataError` before the first update."""
        self._check_started()
        return self.mean_x.shape[0], self.mean_y.shape[0]

    def _check_started(self) -> None:
        if self.count == 0:
            raise DataError("no samples were accumulated (the data yielded no rows)")

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch: ``x`` of shape ``(n, dx)`` and ``y`` of shape ``(n, dy)``, rows paired."""
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"paired features must be (n, dx) and (n, dy) matrices with the same n, got {describe_shapes(x)} "
                f"and {describe_shapes(y)}"
            )
        if self.count and (x.shape[1], y.shape[1]) != self.dims:
            raise DataError(
                f"feature widths changed between batches: {(x.shape[1], y.shape[1])} after {self.dims}"
            )
        n = x.shape[0]
        if n == 0:
            return
        x = x.detach().to(self.dtype)
        y = y.detach().to(self.dtype)
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
        if self.count == 0:
            self.count, self.mean_x, self.mean_y = n, mx, my
            self.sxx, self.sxy = self._scatter(xc), xc.T @ yc
            self.syy = self._scatter(yc) if self.with_yy else None
            return
        total = self.count + n
        dx, dy = mx - self.mean_x, my - self.mean_y
        weight = self.count * n / total
        self.sxx += self._scatter(xc) + weight * self._outer(dx)
        self.sxy += xc.T @ yc + weight * torch.outer(dx, dy)
        if self.with_yy:
            self.syy += self._scatter(yc) + weight * self._outer(dy)
        self.mean_x = self.mean_x + dx * (n / total)
        self.mean_y = self.mean_y + dy * (n / total)
        self.count = total

    def _scatter(self, centered: torch.Tensor) -> torch.Tensor:
        return (centered * centered).sum(0) if self.diagonal else centered.T @ centered

    def _outer(self, delta: torch.Tensor) -> torch.Tensor:
        return delta * delta if self.diagonal else torch.outer(delta, delta)
