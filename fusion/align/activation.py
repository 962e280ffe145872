"""Activation matching (Git Re-Basin's data-based variant; Li et al. 2016, Tatro et al. 2020).

Both models run on the same data; at each group's capture site the cross-correlation of A's
and B's units is streamed (see :mod:`fusion.align.stats`), and one linear assignment per group
on that correlation matrix gives the permutation. Groups that have no observable activation
(attention-internal head groups) are matched on weights instead, with the activation-derived
permutations fixed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..permute import Permutations
from ..spec import PermutationSpec
from .stats import collect_pair_stats, sites_for
from .weight import group_similarity, solve_assignment, weight_matching

__all__ = ["activation_matching"]


def activation_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    progress: bool = True,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[Permutations, list[float], list[str]]:
    """Permutations of B's units that maximise the correlation with A's units on ``data``.

    Returns:
        ``(perms, history, fallback)``: permutations, the matched correlation summed per group
        (in spec order), and the groups matched on weights because they have no activation.
    """
    sites, missing = sites_for(spec, model_a)
    stats = collect_pair_stats(model_a, model_b, sites, sites, data, progress=progress)
    perms: Permutations = {name: solve_assignment(pair.correlation()) for name, pair in stats.items()}
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    # Units that never vary, or vary on the same few samples, tie on correlation; a tiny
    # weight-similarity term breaks such ties without overriding any real difference. The
    # weights depend on the neighbouring groups' permutations, so repeat until none changes.
    for _ in range(max(1, max_iter)):
        changed = False
        for name, pair in stats.items():
            weights = group_similarity(spec, spec.group(name), state_a, state_b, perms)
            new = solve_assignment(pair.correlation() + 1e-6 * weights / weights.abs().max().clamp_min(1e-30))
            changed |= not torch.equal(new, perms[name])
            perms[name] = new
        if not changed:
            break
    history = [float(pair.correlation()[torch.arange(pair.size_a), perms[name]].sum()) for name, pair in stats.items()]
    if missing:
        fixed, _ = weight_matching(
            spec, model_a.state_dict(), model_b.state_dict(), max_iter=max_iter, seed=seed,
            progress=False, init=perms, groups=set(missing),
        )
        perms.update({name: fixed[name] for name in missing})
    return perms, history, missing
