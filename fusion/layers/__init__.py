"""fusion.layers: layers that fit themselves by least squares (the :class:`Regressable` protocol).

Usable as ordinary layers (they train by gradient descent like ``nn.Linear`` / ``nn.Conv2d``) and
settable in closed form from data: ``layer.fit(x, y)`` on one batch, or
``layer.fit_moments(moments)`` after streaming batches through ``layer.update_moments(moments, x, y)``
(:class:`~fusion.moments.CrossMoments`, memory independent of the data size).

* :class:`RegressableLinear`, :class:`RegressableConv2d`: ``nn.Linear`` / ``nn.Conv2d`` with ``fit``;
* :class:`LowRankLinear`, :class:`LowRankConv2d`: rank-``r`` maps, fitted by reduced-rank regression;
* :class:`ProcrustesLinear`, :class:`ProcrustesConv2d`: scaled (semi-)orthogonal maps with optional
  shift and scale, fitted by orthogonal Procrustes.

The stitching layers of :func:`fusion.stitch` are these layers.
"""

from __future__ import annotations

from .conv import LowRankConv2d, ProcrustesConv2d, RegressableConv2d
from .linear import LowRankLinear, ProcrustesLinear, RegressableLinear
from .regression import Regressable, RegressableMixin, SemiOrthogonal, least_squares, procrustes, reduced_rank

__all__ = [
    "LowRankConv2d",
    "LowRankLinear",
    "ProcrustesConv2d",
    "ProcrustesLinear",
    "Regressable",
    "RegressableConv2d",
    "RegressableLinear",
    "RegressableMixin",
    "SemiOrthogonal",
    "least_squares",
    "procrustes",
    "reduced_rank",
]
