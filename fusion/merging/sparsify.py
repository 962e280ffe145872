"""Sparsification of task vectors (the "trim" / "drop" steps of TIES, DARE and Model Breadcrumbs).

Each function takes one task vector (a fine-tune's weights minus the base's) and returns a tensor of
the same shape with some entries zeroed, optionally rescaled so that the L1 norm of the kept entries
equals the L1 norm of the whole vector (mergekit's ``rescale``). The numerical conventions
(how many entries are kept, the tie order, the rescaling guard) are those of mergekit, so that a
merge computed here equals mergekit's element for element.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["keep_largest", "keep_middle", "keep_random", "rescale_l1"]

_RESCALE_EPS = 1e-7


def rescale_l1(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``tensor * mask``; with ``rescale``, scaled so that its L1 norm equals ``tensor``'s.

    Nothing is rescaled when either norm is below 1e-7 (an all-zero vector stays zero).
    """
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return masked
    return masked * (before / after)


def _magnitudes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.abs().reshape(-1)
    return flat.float() if flat.device.type == "cpu" else flat


def _kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """The ``k``-th largest value of a flat tensor (a linear-time selection; no index array)."""
    if magnitudes.device.type == "cpu":
        values = magnitudes.numpy()
        return float(np.partition(values, values.size - k)[values.size - k])
    return float(torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values)


def keep_largest(tensor: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES' trim step).

    ``k = max(1, int(density * numel))`` entries are kept (mergekit's count): those above the
    ``k``-th largest magnitude, then as many of those equal to it as needed (the order among equal
    magnitudes is unspecified, as with mergekit's unstable sort; at magnitude 0 it makes no
    difference). ``density >= 1`` keeps everything.
    """
    if density >= 1:
        return tensor
    if tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    magnitudes = _magnitudes(tensor)
    threshold = _kth_largest(magnitudes, k)
    keep = magnitudes > threshold
    missing = k - int(keep.sum())
    if missing > 0 and threshold > 0:
        keep[torch.nonzero(magnitudes == threshold).squeeze(1)[:missing]] = True
    del magnitudes
    return rescale_l1(tensor, keep.reshape(tensor.shape), rescale)


def keep_middle(tensor: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Drop the ``gamma`` fraction of largest-magnitude entries and then the smallest ones, keeping
    ``density`` of all entries (Model Breadcrumbs). The outlier cut shrinks when both cuts would
    leave fewer than ``density`` of the entries.
    """
    if density >= 1:
        return tensor
    numel = tensor.numel()
    kept = int(density * numel)
    bottom = max(0, numel - kept - int(gamma * numel))
    order = torch.sort(_magnitudes(tensor), descending=False).indices
    mask = torch.zeros(numel, dtype=tensor.dtype, device=tensor.device)
    mask[order[bottom:bottom + kept]] = 1
    return rescale_l1(tensor, mask.reshape_as(tensor), rescale)


def keep_random(tensor: torch.Tensor, density: float, rescale: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE's drop step).

    The mask is one ``torch.bernoulli`` draw from ``generator`` (the global generator when None),
    in float32 on the CPU (bfloat16 and every dtype on accelerators draw in their own dtype), so a
    generator seeded like mergekit's ``--random-seed`` reproduces its masks when tensors are drawn
    in the same order.
    """
    if density >= 1:
        return tensor
    cpu_upcast = tensor.device.type == "cpu" and tensor.dtype != torch.bfloat16
    work = torch.float32 if cpu_upcast else tensor.dtype
    mask = torch.bernoulli(torch.full_like(tensor, density, dtype=work), generator=generator)
    return rescale_l1(tensor.to(work), mask, rescale).to(tensor.dtype)
