"""The :class:`Regressable` protocol and the closed-form solvers behind it.

A regressable layer is an affine map ``y = W d(x) + b`` where ``d(x)`` is the layer's *design*: the
input features themselves for a linear layer, the unfolded input patches for a convolution. Such a
layer can be set in closed form to approximate any function from (input, target) samples: the
sufficient statistics are the means and (cross-)scatter matrices of ``d(x)`` and ``y``, streamed with
:class:`~fusion.moments.CrossMoments`, so a fit over a whole data set needs memory independent
of its size. Solvers: ordinary/ridge least squares, reduced-rank regression (Izenman, 1975) and the
orthogonal Procrustes problem with optional scale (Schonemann, 1966).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Self, runtime_checkable

import torch
from torch import nn

from ..errors import DataError, LayerError
from ..moments import CrossMoments

__all__ = [
    "Regressable",
    "RegressableMixin",
    "SemiOrthogonal",
    "check_rank",
    "least_squares",
    "procrustes",
    "reduced_rank",
]


@runtime_checkable
class Regressable(Protocol):
    """A layer that can be fitted by least squares to map inputs ``x`` onto targets ``y``."""

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, ridge: float = 0.0) -> Self:
        """Fit on one batch of inputs and the outputs the layer should produce for them."""
        ...

    def update_moments(self, moments: CrossMoments, x: torch.Tensor, y: torch.Tensor) -> CrossMoments:
        """Add a batch to streamed statistics (for a fit over many batches)."""
        ...

    def fit_moments(self, moments: CrossMoments, *, ridge: float = 0.0) -> Self:
        """Fit from statistics accumulated with :meth:`update_moments`."""
        ...

    def weight_matrix(self) -> torch.Tensor:
        """The effective ``(out, design)`` matrix ``W``."""
        ...


def _pinv_psd(matrix: torch.Tensor, ridge: float, rcond: float) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix, with ridge ``ridge * mean eigenvalue`` on the diagonal."""
    values, vectors = torch.linalg.eigh(matrix)
    top = values.max().clamp_min(0.0)
    shifted = values + ridge * values.clamp_min(0.0).mean()
    keep = shifted > rcond * top
    inverse = torch.where(keep, 1.0 / torch.where(keep, shifted, torch.ones_like(shifted)), torch.zeros_like(shifted))
    return (vectors * inverse) @ vectors.T


def least_squares(sxx: torch.Tensor, sxy: torch.Tensor, ridge: float = 0.0, rcond: float = 1e-10) -> torch.Tensor:
    """``W`` (out, in) minimising ``||Y - X W^T||^2 (+ ridge)`` from ``X^T X`` and ``X^T Y``."""
    return (_pinv_psd(sxx, ridge, rcond) @ sxy).T


def reduced_rank(
    sxx: torch.Tensor, sxy: torch.Tensor, rank: int, ridge: float = 0.0, rcond: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` least squares: factors ``(up (out, rank), down (rank, in))`` with ``W = up @ down``."""
    ols = least_squares(sxx, sxy, ridge, rcond)
    fitted = ols @ sxx @ ols.T
    _, vectors = torch.linalg.eigh((fitted + fitted.T) / 2)
    top = vectors[:, -rank:]
    return top, top.T @ ols


def procrustes(sxx: torch.Tensor, sxy: torch.Tensor, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, s)``: the semi-orthogonal ``R`` (out, in) and scale ``s`` minimising ``||Y - s X R^T||^2``.

    ``s = 1`` when ``scale`` is False.
    """
    u, sv, vh = torch.linalg.svd(sxy, full_matrices=False)
    rotation = (u @ vh).T
    total = torch.trace(sxx)
    factor = sv.sum() / total if scale and total > 0 else torch.ones((), dtype=sv.dtype, device=sv.device)
    return rotation, factor


def _orthogonal_completion(matrix: torch.Tensor) -> torch.Tensor:
    """A square orthogonal matrix whose leading rows (wide input) or columns (tall input) are ``matrix``."""
    rows, cols = matrix.shape
    tall = matrix if rows >= cols else matrix.T
    n, k = tall.shape
    noise = torch.randn(n, n - k, generator=torch.Generator().manual_seed(0), dtype=tall.dtype).to(tall.device)
    q, _ = torch.linalg.qr(torch.cat([tall, noise], 1))
    completed = torch.cat([tall, q[:, k:]], 1)
    return completed if rows >= cols else completed.T


class SemiOrthogonal(nn.Module):
    """A trainable ``(rows, cols)`` matrix with orthonormal rows (wide) or columns (tall).

    Parameterised as the leading block of ``base @ matrix_exp(A - A^T)`` with a fixed orthogonal
    ``base`` (a buffer) and a free square ``A`` (the parameter), so gradient steps stay on the
    constraint set; :meth:`set_` re-bases it at a given matrix (``A = 0``), which is how a closed-form
    fit is written in. Plain parameters and buffers: state dicts and pickling work as for any layer.
    """

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        size = max(rows, cols)
        self.register_buffer("base", torch.eye(size))
        self.skew = nn.Parameter(torch.zeros(size, size))

    def forward(self) -> torch.Tensor:
        rotation = self.base @ torch.linalg.matrix_exp(self.skew - self.skew.T)
        return rotation[: self.rows, : self.cols]

    @torch.no_grad()
    def set_(self, matrix: torch.Tensor) -> None:
        """Make the matrix equal ``matrix`` (itself semi-orthogonal, shape ``(rows, cols)``)."""
        self.base.copy_(_orthogonal_completion(matrix.to(torch.float64)).to(self.base))
        self.skew.zero_()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A random semi-orthogonal matrix (Haar-distributed)."""
        q, r = torch.linalg.qr(torch.randn(self.base.shape, dtype=torch.float64))
        self.base.copy_((q * torch.sign(torch.diagonal(r))).to(self.base))
        self.skew.zero_()

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}"


class RegressableMixin:
    """Shared implementation of :class:`Regressable` for ``nn.Module`` layers.

    A layer supplies :meth:`design` (inputs -> ``(samples, design)`` rows), :meth:`targets` (outputs ->
    ``(samples, out)`` rows), :meth:`weight_matrix`, a ``bias`` (a parameter or None) and
    ``_solve(sxx, sxy, ridge, rcond)``, which writes the fitted parameters and returns the effective ``W``.
    Without a bias the fit uses uncentred moments (the map passes through the origin).
    """

    bias: nn.Parameter | None

    def design(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(samples, design)`` rows the layer's matrix multiplies."""
        raise NotImplementedError

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """The ``(samples, out)`` rows of outputs ``y``, paired with :meth:`design` rows."""
        raise NotImplementedError

    def weight_matrix(self) -> torch.Tensor:
        """The effective ``(out, design)`` matrix."""
        raise NotImplementedError

    def _solve(self, sxx: torch.Tensor, sxy: torch.Tensor, ridge: float, rcond: float) -> torch.Tensor:
        raise NotImplementedError

    def update_moments(self, moments: CrossMoments, x: torch.Tensor, y: torch.Tensor) -> CrossMoments:
        """Add the pairs (inputs ``x``, desired outputs ``y``) of one batch to ``moments``; returns it."""
        design, targets = self.design(x.detach()), self.targets(y.detach())
        if design.shape[0] != targets.shape[0]:
            raise DataError(
                f"{type(self).__name__}: inputs {tuple(x.shape)} give {design.shape[0]} samples but targets "
                f"{tuple(y.shape)} give {targets.shape[0]}; the targets must have the layer's output shape"
            )
        moments.update(design, targets)
        return moments

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, ridge: float = 0.0, rcond: float = 1e-10) -> Self:
        """Set the parameters so that ``layer(x) ~ y`` in least squares (one batch); returns self."""
        return self.fit_moments(self.update_moments(CrossMoments(), x, y), ridge=ridge, rcond=rcond)

    def fit_moments(self, moments: CrossMoments, *, ridge: float = 0.0, rcond: float = 1e-10) -> Self:
        """Set the parameters from statistics gathered with :meth:`update_moments`; returns self."""
        if not ridge >= 0:
            raise DataError(f"ridge must be >= 0, got {ridge!r}")
        moments._check_started()
        sxx, sxy = moments.sxx, moments.sxy
        if self.bias is None:
            sxx = sxx + moments.count * torch.outer(moments.mean_x, moments.mean_x)
            sxy = sxy + moments.count * torch.outer(moments.mean_x, moments.mean_y)
        weight = self._solve(sxx, sxy, ridge, rcond)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_((moments.mean_y - moments.mean_x @ weight.T).to(self.bias))
        return self

    def explained_variance(self, moments: CrossMoments) -> float:
        """``1 - SS_res / SS_tot`` of the current map on the data summarised by ``moments``."""
        if moments.syy is None:
            raise DataError("explained_variance needs moments accumulated with with_yy=True")
        with torch.no_grad():
            w = self.weight_matrix().detach().to(moments.sxx)
            b = self.bias.detach().to(moments.sxx) if self.bias is not None else torch.zeros_like(moments.mean_y)
            total = torch.trace(moments.syy)
            shift = moments.mean_y - (w @ moments.mean_x + b)
            residual = total - 2 * torch.trace(w @ moments.sxy) + torch.trace(w @ moments.sxx @ w.T)
            residual = residual + moments.count * shift.dot(shift)
        return float(1.0 - residual / total) if total > 0 else math.nan


def check_rank(rank: Any, in_size: int, out_size: int, owner: str) -> int:
    """``rank`` if it is an int in ``1..min(in_size, out_size)``, else a :class:`LayerError` naming ``owner``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_size, out_size):
        raise LayerError(f"{owner}: rank must be an int in 1..{min(in_size, out_size)}, got {rank!r}")
    return rank
