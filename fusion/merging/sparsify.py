"""Sparsification of task vectors (the "trim" / "drop" steps of TIES, DARE and Model Breadcrumbs).

Each rule computes a *mask* of the entries of one task vector (a fine-tune's weights minus the
base's) to keep; :func:`apply_mask` zeroes the others in place and, with ``rescale``, scales the
kept entries so that the vector's L1 norm is unchanged (mergekit's ``rescale``). Working in place
keeps the memory of a merge near one extra copy of the tensor. The conventions (how many entries are
kept, the rescaling guard, float32 masks drawn on the CPU) are mergekit's, so that a merge computed
here equals mergekit's element for element. The ``keep_*`` functions return a sparsified copy.
"""

from __future__ import annotations

import torch

__all__ = ["apply_mask", "keep_largest", "keep_middle", "keep_random", "largest_mask", "middle_mask", "random_mask"]

_RESCALE_EPS = 1e-7


def apply_mask(tensor: torch.Tensor, mask: torch.Tensor | None, rescale: bool) -> torch.Tensor:
    """Zero ``tensor`` (in place) where ``mask`` is 0; with ``rescale``, restore its L1 norm.

    ``mask=None`` keeps everything. Nothing is rescaled when either norm is below 1e-7.
    """
    if mask is None:
        return tensor
    before = tensor.abs().sum() if rescale else None
    tensor.mul_(mask)
    if before is not None:
        after = tensor.abs().sum()
        if before >= _RESCALE_EPS and after >= _RESCALE_EPS:
            tensor.mul_(before / after)
    return tensor


def _magnitudes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.abs().reshape(-1)
    return flat.float() if flat.device.type == "cpu" else flat


def _kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """The ``k``-th largest value of a flat tensor, which is reordered (linear-time selection, no index array)."""
    if magnitudes.device.type == "cpu":
        values = magnitudes.numpy()
        values.partition(values.size - k)
        return float(values[values.size - k])
    return float(torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values)


def largest_mask(tensor: torch.Tensor, density: float) -> torch.Tensor | None:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES' trim step).

    ``k = max(1, int(density * numel))`` entries are kept (mergekit's count): those above the
    ``k``-th largest magnitude, then as many of those equal to it as needed (the order among equal
    magnitudes is unspecified, as with mergekit's unstable sort; at magnitude 0 it makes no
    difference). ``density >= 1`` keeps everything (None).
    """
    if density >= 1:
        return None
    if tensor.numel() == 0:
        return torch.zeros_like(tensor, dtype=torch.bool)
    k = max(1, int(density * tensor.numel()))
    threshold = _kth_largest(_magnitudes(tensor), k)
    magnitudes = _magnitudes(tensor)
    keep = magnitudes > threshold
    missing = k - int(keep.sum())
    if missing > 0 and threshold > 0:
        keep[torch.nonzero(magnitudes == threshold).squeeze(1)[:missing]] = True
    return keep.reshape(tensor.shape)


def middle_mask(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Drop the ``gamma`` fraction of largest-magnitude entries and then the smallest ones, keeping
    ``density`` of all entries (Model Breadcrumbs). The outlier cut shrinks when both cuts would
    leave fewer than ``density`` of the entries.
    """
    if density >= 1:
        return None
    numel = tensor.numel()
    kept = int(density * numel)
    bottom = max(0, numel - kept - int(gamma * numel))
    order = torch.sort(_magnitudes(tensor), descending=False).indices
    mask = torch.zeros(numel, dtype=torch.bool, device=tensor.device)
    mask[order[bottom:bottom + kept]] = True
    return mask.reshape(tensor.shape)


def random_mask(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Keep each entry independently with probability ``density`` (DARE's drop step).

    The mask is one ``torch.bernoulli`` draw from ``generator`` (the global generator when None), in
    float32 on the CPU (bfloat16 and every dtype on accelerators draw in their own dtype), so a
    generator seeded like mergekit's ``--random-seed`` reproduces its masks when tensors are drawn in
    the same order.
    """
    if density >= 1:
        return None
    cpu_upcast = tensor.device.type == "cpu" and tensor.dtype != torch.bfloat16
    work = torch.float32 if cpu_upcast else tensor.dtype
    return torch.bernoulli(torch.full_like(tensor, density, dtype=work), generator=generator)


def keep_largest(tensor: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """A copy of ``tensor`` sparsified by :func:`largest_mask`."""
    return apply_mask(tensor.clone(), largest_mask(tensor, density), rescale)


def keep_middle(tensor: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """A copy of ``tensor`` sparsified by :func:`middle_mask`."""
    return apply_mask(tensor.clone(), middle_mask(tensor, density, gamma), rescale)


def keep_random(tensor: torch.Tensor, density: float, rescale: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of ``tensor`` sparsified by :func:`random_mask`."""
    return apply_mask(tensor.clone(), random_mask(tensor, density, generator), rescale)
