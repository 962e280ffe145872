"""Empirical neural tangent kernels: the kernel, its spectrum, alignment between models, and along a path.

The empirical NTK of a model ``f(x; theta)`` (Jacot, Gabriel & Hongler, 2018) on inputs ``x1, x2`` is

    Theta(x1, x2) = J(x1) J(x2)^T,    J(x) = d f(x; theta) / d theta,

an ``(out, out)`` block per pair of inputs. It is computed here with ``torch.func`` (per-sample
Jacobians by ``vmap(jacrev(...))``, the recipe of the torch.func NTK tutorial) in float precision of
the model, with the model in eval mode and its buffers untouched. Kernel alignment (Cristianini et
al., 2002) compares two kernels on the same inputs, e.g. a model before and after fusion; the kernel
distance ``1 - alignment`` along the straight line between two models shows how the tangent features
change on the path (Fort et al., 2020, "Deep learning versus kernel learning").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ..checks import check_models, eval_mode
from ..errors import DataError
from ..fuse.average import interpolate

__all__ = ["NTKPath", "empirical_ntk", "kernel_alignment", "ntk_alignment", "ntk_eigenvalues", "ntk_path"]

REDUCTIONS = ("trace", "full")


def _jacobians(model: nn.Module, x: torch.Tensor, chunk_size: int | None) -> list[torch.Tensor]:
    """Per-sample Jacobians of the flattened output, one ``(n, out, numel)`` tensor per trainable parameter."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise DataError(f"{type(model).__name__} has no trainable parameters: its NTK is zero")
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def single(p: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (p, buffers), (sample.unsqueeze(0),)).reshape(-1)

    with eval_mode(model):
        jac = vmap(jacrev(single), (None, 0), chunk_size=chunk_size)(params, x)
    return [j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()]


def _check_inputs(x: torch.Tensor, argument: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise DataError(f"{argument} must be a non-empty batch tensor (n, ...), got {type(x).__name__}")


def empirical_ntk(
    model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, reduce: str = "trace", chunk_size: int | None = None
) -> torch.Tensor:
    """The empirical NTK of ``model`` between the inputs ``x1`` and ``x2`` (``x1`` itself when None).

    Args:
        model: any model mapping a batch ``(n, ...)`` to outputs ``(n, *out)`` (flattened to ``out``
            values per sample); it runs in eval mode, one sample at a time, and is not modified.
        x1: ``(n1, ...)`` inputs; x2: ``(n2, ...)`` inputs.
        reduce: ``"trace"`` sums the diagonal of each ``(out, out)`` block, giving ``(n1, n2)``;
            ``"full"`` keeps the blocks, giving ``(n1, n2, out, out)``.
        chunk_size: samples per vmap chunk (limits memory; None: all at once).

    Returns:
        The kernel, in the model's dtype, on its device.
    """
    if reduce not in REDUCTIONS:
        raise DataError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    _check_inputs(x1, "x1")
    jac1 = _jacobians(model, x1, chunk_size)
    if x2 is None:
        jac2 = jac1
    else:
        _check_inputs(x2, "x2")
        jac2 = _jacobians(model, x2, chunk_size)
    pattern = "naf,maf->nm" if reduce == "trace" else "naf,mbf->nmab"
    return sum(torch.einsum(pattern, a, b) for a, b in zip(jac1, jac2))


def _square(kernel: torch.Tensor) -> torch.Tensor:
    """A ``(n, n)`` or ``(n, n, o, o)`` kernel as an ``(n*o, n*o)`` symmetric matrix."""
    if kernel.dim() == 2 and kernel.shape[0] == kernel.shape[1]:
        return kernel
    if kernel.dim() == 4 and kernel.shape[0] == kernel.shape[1] and kernel.shape[2] == kernel.shape[3]:
        n, _, o, _ = kernel.shape
        return kernel.permute(0, 2, 1, 3).reshape(n * o, n * o)
    raise DataError(f"expected a square kernel (n, n) or (n, n, out, out), got shape {tuple(kernel.shape)}")


def ntk_eigenvalues(kernel: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending, float64) of an NTK computed on one set of inputs (``x2=None``)."""
    square = _square(kernel).double()
    return torch.linalg.eigvalsh((square + square.T) / 2).flip(0)


def kernel_alignment(k1: torch.Tensor, k2: torch.Tensor, centered: bool = False) -> float:
    """``<K1, K2>_F / (||K1||_F ||K2||_F)`` (Cristianini et al., 2002); 1 for proportional kernels.

    ``centered=True`` centres both kernels first (Cortes, Mohri & Rostamizadeh, 2012), which ignores
    a constant offset shared by all pairs of inputs.
    """
    if k1.shape != k2.shape:
        raise DataError(f"kernels of different shapes: {tuple(k1.shape)} and {tuple(k2.shape)}")
    a, b = _square(k1).double(), _square(k2).double()
    if centered:
        h = torch.eye(a.shape[0], dtype=a.dtype, device=a.device) - 1.0 / a.shape[0]
        a, b = h @ a @ h, h @ b.to(a.device) @ h
    denominator = a.norm() * b.norm()
    if denominator == 0:
        raise DataError("kernel alignment is undefined for a zero kernel")
    return float((a * b.to(a.device)).sum() / denominator)


def ntk_alignment(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, reduce: str = "trace",
                  centered: bool = False) -> float:
    """Alignment of the NTKs of two models on the same inputs (e.g. before and after fusion)."""
    return kernel_alignment(empirical_ntk(model_a, x, reduce=reduce), empirical_ntk(model_b, x, reduce=reduce), centered)


@dataclass(frozen=True)
class NTKPath:
    """NTK along the straight line ``(1 - alpha) A + alpha B``.

    Attributes:
        alphas: the interpolation coefficients.
        distance_to_a: ``1 - alignment`` of the NTK at each alpha with A's NTK.
        distance_to_b: the same with B's NTK.
        trace: the trace of the NTK at each alpha (its overall scale).
    """

    alphas: tuple[float, ...]
    distance_to_a: tuple[float, ...]
    distance_to_b: tuple[float, ...]
    trace: tuple[float, ...]


def ntk_path(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, alphas: Sequence[float] | int = 11,
             reduce: str = "trace") -> NTKPath:
    """The NTK distance to both end points along the straight line between two models.

    Args:
        model_a, model_b: models of one architecture (neither is modified).
        x: inputs on which the kernels are compared.
        alphas: coefficients, or a number of evenly spaced ones in [0, 1].
        reduce: ``"trace"`` or ``"full"`` kernels (see :func:`empirical_ntk`).
    """
    check_models([model_a, model_b], ["model_a", "model_b"])
    grid = np.linspace(0.0, 1.0, alphas) if isinstance(alphas, int) else np.asarray(alphas, dtype=np.float64)
    if grid.size == 0:
        raise DataError("alphas is empty")
    end_a, end_b = empirical_ntk(model_a, x, reduce=reduce), empirical_ntk(model_b, x, reduce=reduce)
    to_a, to_b, traces = [], [], []
    for alpha in grid:
        kernel = empirical_ntk(interpolate(model_a, model_b, float(alpha)), x, reduce=reduce)
        to_a.append(1.0 - kernel_alignment(kernel, end_a))
        to_b.append(1.0 - kernel_alignment(kernel, end_b))
        traces.append(float(torch.trace(_square(kernel))))
    return NTKPath(tuple(float(a) for a in grid), tuple(to_a), tuple(to_b), tuple(traces))
