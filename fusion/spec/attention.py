"""Per-head permutation groups of ``nn.MultiheadAttention``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .records import AxisMember, PermutationGroup


def _attention_groups(name: str, mha: nn.MultiheadAttention, canonical: dict[str, str]) -> list[PermutationGroup]:
    """Per-head groups of ``nn.MultiheadAttention``: q/k rows share a permutation, v rows move
    with the output projection's columns, and whole heads can be reordered."""
    if not mha._qkv_same_embed_dim:
        return []
    e, h = mha.embed_dim, mha.num_heads
    d = e // h

    def key(local: str) -> str:
        full = f"{name}.{local}"
        return canonical.get(full, full)

    def rows(offsets: Sequence[int], units: torch.Tensor) -> torch.Tensor:
        return torch.stack([units + o for o in offsets], dim=-1).reshape(len(units), -1)

    groups = []
    has_bias = mha.in_proj_bias is not None
    for head in range(h):
        base = torch.arange(head * d, (head + 1) * d)
        qk = rows([0, e], base)
        v = rows([2 * e], base)
        qk_members = [AxisMember(key("in_proj_weight"), 0, qk)]
        v_members = [AxisMember(key("in_proj_weight"), 0, v), AxisMember(key("out_proj.weight"), 1, base[:, None])]
        if has_bias:
            qk_members.append(AxisMember(key("in_proj_bias"), 0, qk))
            v_members.append(AxisMember(key("in_proj_bias"), 0, v))
        if mha.bias_k is not None:
            qk_members.append(AxisMember(key("bias_k"), 2, base[:, None]))
            v_members.append(AxisMember(key("bias_v"), 2, base[:, None]))
        producers = (name,)
        groups.append(PermutationGroup(f"{name}.head{head}.qk", d, tuple(qk_members), producers, producers, "head_qk"))
        groups.append(PermutationGroup(f"{name}.head{head}.v", d, tuple(v_members), producers, producers, "head_v"))
    if h > 1:
        heads = torch.arange(h)[:, None] * d + torch.arange(d)[None, :]  # (h, d)
        qkv = torch.cat([heads, heads + e, heads + 2 * e], dim=1)
        head_members = [AxisMember(key("in_proj_weight"), 0, qkv), AxisMember(key("out_proj.weight"), 1, heads)]
        if has_bias:
            head_members.append(AxisMember(key("in_proj_bias"), 0, qkv))
        if mha.bias_k is not None:
            head_members += [AxisMember(key("bias_k"), 2, heads), AxisMember(key("bias_v"), 2, heads)]
        groups.append(PermutationGroup(f"{name}.heads", h, tuple(head_members), (name,), (name,), "heads"))
    return groups


# --------------------------------------------------------------------------------------------
# Building and verifying a spec
# --------------------------------------------------------------------------------------------

