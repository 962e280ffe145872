"""Checking that a permutation group's indices fit the model's tensors before anything applies them."""

from __future__ import annotations

import torch

from .records import AxisMember, PermutationGroup, SkippedGroup

__all__ = ["check_indices"]


def _member_problem(member: AxisMember, size: int, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a member's index cannot be applied to its tensor (None if it can)."""
    shape = shapes.get(member.name)
    if shape is None:
        return f"{member.name} is not a tensor of the model's state dict"
    if not 0 <= member.axis < len(shape):
        return f"{member.name} of shape {shape} has no axis {member.axis}"
    index = member.index
    if index.dim() != 2 or index.shape[0] != size or index.shape[1] < 1 or index.dtype != torch.long:
        return f"the index of {member.name} has shape {tuple(index.shape)}, not ({size}, block)"
    if int(index.min()) < 0 or int(index.max()) >= shape[member.axis]:
        return (f"positions {int(index.min())}..{int(index.max())} of {member.name} (axis {member.axis}) are out of "
                f"range for length {shape[member.axis]}")
    if index.unique().numel() != index.numel():
        return f"one position of {member.name} (axis {member.axis}) belongs to several units"
    return None


def check_indices(groups: list[PermutationGroup], shapes: dict[str, tuple[int, ...]], source: str = "torch-pruning"
                  ) -> tuple[list[PermutationGroup], list[SkippedGroup]]:
    """Refuse (kind ``"unmapped"``) groups whose indices do not fit their tensors, or that move positions
    of a tensor axis another channel group already moves (attention groups overlap by design)."""
    accepted, refused = [], []
    taken: dict[tuple[str, int], torch.Tensor] = {}
    for group in groups:
        problem = next((p for m in group.members if (p := _member_problem(m, group.size, shapes))), None)
        if problem is None and group.kind == "channels":
            clash = next((m for m in group.members if (m.name, m.axis) in taken
                          and bool(taken[(m.name, m.axis)][m.index.reshape(-1)].any())), None)
            if clash is not None:
                problem = f"positions of {clash.name} (axis {clash.axis}) are also moved by another group"
        if problem is not None:
            refused.append(SkippedGroup(group.name, group.size, f"{source} maps these units inconsistently: "
                                        f"{problem}", "unmapped"))
            continue
        accepted.append(group)
        if group.kind == "channels":
            for m in group.members:
                mask = taken.setdefault((m.name, m.axis), torch.zeros(shapes[m.name][m.axis], dtype=torch.bool))
                mask[m.index.reshape(-1)] = True
    return accepted, refused
