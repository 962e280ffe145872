"""Channel rules of the flow tracer for contractions between activations: matmul, einsum, attention."""

from __future__ import annotations

import torch

from .patterns_flow import NONE, _Tracer, _Unknown
from .patterns_ops import _arg, _broadcast_on, _consume, _rule, _varies


def _batch_tags(tr: _Tracer, batch: torch.Size, tail: int) -> torch.Tensor:
    n = 1
    for s in batch:
        n *= s
    return (tr.new_tag(n) + torch.arange(n)).reshape(*batch, 1).expand(*batch, tail)


def _contract(tr: _Tracer, la: torch.Tensor, lb: torch.Tensor, out: torch.Tensor | None, what: str) -> torch.Tensor | None:
    """a (..., n, k) @ b (..., k, m), tying every unit involved to the batch coordinates (heads) it met at.

    Along k, each side either holds one unit per position (q and k in ``q @ k^T``: the two are joined)
    or the same labels at every position (attention weights and values in ``attn @ v``: they pass
    through to the rows and columns of the result).
    """
    if la.dim() < 2 or lb.dim() < 2:
        raise _Unknown(f"{what} of vectors")
    a_through, b_through = not _varies(la, la.dim() - 1), not _varies(lb, lb.dim() - 2)
    if not a_through and _varies(la, la.dim() - 2) or not b_through and _varies(lb, lb.dim() - 1):
        raise _Unknown(f"{what} contracts units that change along its rows")
    batch = torch.broadcast_shapes(la.shape[:-2], lb.shape[:-2])
    if not a_through or not b_through:
        ka, kb = la[..., 0, :], lb[..., :, 0]
        ka, kb = ka.expand(*batch, ka.shape[-1]), kb.expand(*batch, kb.shape[-1])
        if a_through or b_through:  # units contracted with values that carry no unit per position
            tr.flow.pin(kb if a_through else ka, f"{what} contracts units with values that do not follow them")
        else:
            tr.flow.join(ka, kb)
        tr.flow.tag(ka, _batch_tags(tr, batch, ka.shape[-1]))
        tr.flow.tag(kb, _batch_tags(tr, batch, kb.shape[-1]))
    if out is None:
        return None
    none = torch.full(out.shape, NONE, dtype=torch.long)
    rows = la[..., :, 0].expand(*batch, la.shape[-2]) if a_through else none[..., :, 0]
    cols = lb[..., 0, :].expand(*batch, lb.shape[-1]) if b_through else none[..., 0, :]
    tr.flow.tag(rows, _batch_tags(tr, batch, rows.shape[-1]))
    tr.flow.tag(cols, _batch_tags(tr, batch, cols.shape[-1]))
    if bool((rows >= 0).any()) and bool((cols >= 0).any()):
        if _varies(rows, rows.dim() - 1):
            raise _Unknown(f"{what} of units by units (an outer product)")
        tr.flow.tag(rows, torch.full_like(rows, tr.new_tag(1)))  # e.g. a head's bias column: never grouped
        return cols[..., None, :].expand(out.shape)
    return torch.where(rows[..., :, None] >= 0, rows[..., :, None], cols[..., None, :]).expand(out.shape)


@_rule("matmul", "bmm", "rmatmul")
def _matmul(tr: _Tracer, func, args, kwargs, out) -> None:
    a, b = args[0], args[1]
    if getattr(func, "__name__", "") == "__rmatmul__":
        a, b = b, a
    if tr.param_name(a) is not None:
        raise _Unknown("matrix product with a parameter on the left")
    if tr.param_name(b) is not None and b.dim() == 2:
        name = tr.param_name(b)
        lab = tr.label(a)
        in_slots = tr.flow.axis_slots(name, 0, b.shape[0], "in")
        out_slots = tr.flow.axis_slots(name, 1, b.shape[1], "out")
        _consume(tr, lab.reshape(-1, b.shape[0]), in_slots, name)
        tr.set_label(out, _broadcast_on(out_slots, out, out.dim() - 1))
        return
    tr.set_label(out, _contract(tr, tr.label(a), tr.label(b), out, "matrix product"))


@_rule("einsum")
def _einsum(tr: _Tracer, func, args, kwargs, out) -> None:
    """Two-operand einsum without ellipsis, as a batched matrix product (batch, free-a, contracted, free-b)."""
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    equation = equation.replace(" ", "")
    if len(operands) != 2 or "..." in equation or "->" not in equation:
        raise _Unknown("einsum other than a product of two operands with an explicit output")
    inputs, result = equation.split("->")
    sa, sb = inputs.split(",")
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or any(c not in sa + sb for c in result):
        raise _Unknown("einsum with repeated or unknown indices")
    a, b = operands
    if tr.param_name(a) is not None or tr.param_name(b) is not None:
        raise _Unknown("einsum with a parameter")
    batch = [c for c in sa if c in sb and c in result]
    contracted = [c for c in sa if c in sb and c not in result]
    free_a = [c for c in sa if c not in sb]
    free_b = [c for c in sb if c not in sa]
    if any(c not in result for c in free_a + free_b):
        raise _Unknown("einsum summing over an index of one operand")
    size = {c: n for c, n in zip(sa, a.shape)} | {c: n for c, n in zip(sb, b.shape)}

    def prod(cs: list[str]) -> int:
        n = 1
        for c in cs:
            n *= size[c]
        return n

    la = tr.label(a).permute(*[sa.index(c) for c in batch + free_a + contracted])
    lb = tr.label(b).permute(*[sb.index(c) for c in batch + contracted + free_b])
    la = la.reshape(*[size[c] for c in batch], prod(free_a), prod(contracted))
    lb = lb.reshape(*[size[c] for c in batch], prod(contracted), prod(free_b))
    flat = torch.empty(*[size[c] for c in batch], prod(free_a), prod(free_b))
    labels = _contract(tr, la, lb, flat, "einsum")
    order = batch + free_a + free_b
    labels = labels.reshape(*[size[c] for c in order]).permute(*[order.index(c) for c in result])
    tr.set_label(out, labels)


@_rule("scaled_dot_product_attention")
def _sdpa(tr: _Tracer, func, args, kwargs, out) -> None:
    q, k, v = args[:3]
    mask = _arg(args, kwargs, 3, "attn_mask")
    if isinstance(mask, torch.Tensor) and bool((tr.label(mask) >= 0).any()):
        raise _Unknown("attention with a mask that carries units")
    _contract(tr, tr.label(q), tr.label(k).transpose(-1, -2), None, "attention")
    la = torch.full(q.shape[:-1] + k.shape[-2:-1], NONE, dtype=torch.long)
    tr.set_label(out, _contract(tr, la, tr.label(v), out, "attention"))

