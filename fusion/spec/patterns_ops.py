"""Channel rules of the flow tracer (:mod:`fusion.spec.patterns_flow`), one per kind of operation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .patterns_flow import NONE, _tensors, _Tracer, _Unknown

RULES: dict[str, Callable] = {}


def _rule(*names: str) -> Callable:
    def register(fn: Callable) -> Callable:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def _labels_of(tr: _Tracer, obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return tr.label(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_labels_of(tr, o) for o in obj)
    return obj


def _contiguous(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.contiguous()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_contiguous(o) for o in obj)
    return obj


def _as_float(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.dtype == torch.long:
        return obj.double()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_float(o) for o in obj)
    return obj


def _as_long(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.round().long() if obj.is_floating_point() else obj.long()
    if isinstance(obj, (list, tuple)):
        return [_as_long(o) for o in obj]
    return obj


def move(tr: _Tracer, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
    """Data movement: the same operation applied to the labels moves them like the data."""
    first = _contiguous(_labels_of(tr, args[0]))
    kwargs = dict(kwargs)
    if "value" in kwargs or func is torch.nn.functional.pad:
        kwargs["value"] = NONE  # padded positions carry no unit
        if len(args) > 3:
            args = args[:3]
    try:
        labels = func(first, *args[1:], **kwargs)
    except (RuntimeError, TypeError, NotImplementedError):
        if "value" in kwargs:
            kwargs["value"] = float(NONE)
        labels = _as_long(func(_as_float(first), *args[1:], **kwargs))
    tr.set_label(out, labels)


def _combine(tr: _Tracer, a: torch.Tensor, b: torch.Tensor, reason: str = "") -> torch.Tensor:
    a, b = torch.broadcast_tensors(a, b)
    tr.flow.join(a, b)
    return torch.where(a >= 0, a, b)


def _varies(labels: torch.Tensor, dim: int) -> bool:
    """Whether two different units meet along ``dim`` somewhere."""
    if labels.shape[dim] < 2:
        return False
    masked = torch.where(labels >= 0, labels, labels.amax() + 1)
    lo = masked.amin(dim)
    hi = torch.where(labels >= 0, labels, -1).amax(dim)
    return bool(((hi >= 0) & (lo != hi)).any())


def elementwise(tr: _Tracer, args: tuple, kwargs: dict, out: Any, inplace: bool = False) -> None:
    """Elementwise operations (with broadcasting): units meeting at one element are one unit."""
    target = out if isinstance(out, torch.Tensor) else _tensors(out)[0]
    tensors = _tensors((args, kwargs))
    params = [t for t in tensors if tr.param_name(t) is not None and t not in tr.labels]
    combined = torch.full(target.shape, NONE, dtype=torch.long)
    for t in tensors:
        if not any(t is p for p in params):
            combined = _combine(tr, combined, tr.label(t).expand_as(combined) if t.dim() <= combined.dim() else tr.label(t))
    for p in params:
        shift = combined.dim() - p.dim()
        axes = [i for i in range(p.dim()) if p.shape[i] > 1 and _varies(combined, i + shift)]
        if len(axes) > 1:
            raise _Unknown(f"parameter {tr.param_name(p)} meets units along several axes")
        lab = tr.label(p, axes[0]) if axes else torch.full(p.shape, NONE, dtype=torch.long)
        combined = _combine(tr, combined, lab)
    tr.set_label(out, combined)


def _dims(x: torch.Tensor, dim: Any) -> list[int]:
    if dim is None:
        return list(range(x.dim()))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted({d % max(x.dim(), 1) for d in dims})


def _reduce_labels(tr: _Tracer, lab: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Labels after reducing ``dims`` (kept as size 1).

    Where every reduced slice holds the same set of units (a mean over all channels, a layer norm),
    the result carries no unit and those units are tagged together (only permuted among themselves).
    Where the sets differ from position to position (summing the radix splits of channel c), each
    set is one unit: its members must move together.
    """
    dims = [d for d in dims if lab.shape[d] > 1]
    if not dims:
        return lab
    kept = [d for d in range(lab.dim()) if d not in dims]
    rows = lab.permute(*kept, *dims).reshape(-1, int(torch.tensor([lab.shape[d] for d in dims]).prod()))
    shape = [1 if d in dims else lab.shape[d] for d in range(lab.dim())]
    if bool((rows == rows[:, :1]).all()):
        return rows[:, 0].reshape(shape)
    ordered = rows.sort(1).values
    if bool((ordered == ordered[:1]).all()):
        tr.flow.tag(rows, torch.full_like(rows, tr.new_tag(1)))
        return torch.full(shape, NONE, dtype=torch.long)
    first = torch.where(rows >= 0, rows, rows.amax(1, keepdim=True)).amin(1, keepdim=True)
    tr.flow.join(rows, first)
    return first.reshape(shape)


def reduce(tr: _Tracer, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
    x = args[0]
    name = getattr(func, "__name__", "")
    dim = kwargs.get("dim", kwargs.get("axis"))
    if dim is None:
        rest = args[2:3] if name == "norm" else args[1:2]
        if rest and isinstance(rest[0], (int, tuple, list)) and not isinstance(rest[0], bool):
            dim = rest[0]
    lab = _reduce_labels(tr, tr.label(x), _dims(x, dim))
    targets = _tensors(out)
    tr.set_label(out, [lab.reshape(t.shape) if lab.numel() == t.numel() else None for t in targets]
                 if not isinstance(out, torch.Tensor) else lab.reshape(out.shape))


def pool(tr: _Tracer, args: tuple, out: Any) -> None:
    """Pooling/resizing acts on the trailing spatial axes of each channel separately."""
    x = args[0]
    first = _tensors(out)[0]
    spatial = [d for d in range(2, x.dim())] if x.dim() >= 3 else [x.dim() - 1]
    lab = tr.label(x)
    for d in spatial:
        if _varies(lab, d):
            raise _Unknown("pooled over positions that carry different units")
    reduced = _reduce_labels(tr, lab, spatial)
    labels = reduced.expand(first.shape)
    tr.set_label(out, [labels, None] if not isinstance(out, torch.Tensor) else labels)


# ---- layers reading a channel axis ---------------------------------------------------------------
def _consume(tr: _Tracer, cols: torch.Tensor, slots: torch.Tensor, what: str) -> None:
    """``cols`` (rows, K) labels read at the K positions of a layer's input axis with ``slots``."""
    if bool((cols == cols[:1]).all()):
        cols = cols[:1]
    tr.flow.join(cols, slots[None, :])
    empty = (cols < 0).all(0)
    if bool(empty.any()):
        tr.flow.pin(slots[empty], f"{what} reads values that carry no unit there")


def _channels_last(lab: torch.Tensor, dim: int) -> torch.Tensor:
    return lab.movedim(dim, -1).reshape(-1, lab.shape[dim])


def _token_mixing(cols: torch.Tensor) -> bool:
    """Each row one unit, different rows different units: the layer mixes positions, not units."""
    return cols.shape[1] > 1 and bool((cols == cols[:, :1]).all()) and bool((cols[:, 0] >= 0).any()) and \
        cols[:, 0].unique().numel() > 1


def _extra(tr: _Tracer, module: nn.Module, name: str, known: set, out_slots: torch.Tensor) -> None:
    """Extra parameters of a layer: one entry per output channel (a standardised conv's gain) move with them."""
    for local, p in module.named_parameters(recurse=False):
        if local in known:
            continue
        if p.dim() >= 1 and p.shape[0] == out_slots.numel() and p.numel() == p.shape[0]:
            tr.flow.join(tr.flow.axis_slots(f"{name}.{local}", 0, p.shape[0], "elem"), out_slots)
        else:
            raise _Unknown(f"{name} has a parameter {local!r} of shape {tuple(p.shape)} with no channel rule")


def _bias(tr: _Tracer, name: str | None, bias: torch.Tensor | None, out_slots: torch.Tensor) -> None:
    if bias is None:
        return
    if name is None:  # a bias computed in the forward (Swin-V2's cat of q, zero and v biases): follow its labels
        tr.flow.join(tr.label(bias), out_slots)
    else:
        tr.flow.join(tr.flow.axis_slots(name, 0, bias.shape[0], "elem"), out_slots)


def _broadcast_on(slots: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return slots.reshape(shape).expand(like.shape)


def linear_labels(tr: _Tracer, x: torch.Tensor, weight_name: str, weight: torch.Tensor, bias_name: str | None,
                  bias: torch.Tensor | None, out: torch.Tensor, what: str) -> torch.Tensor:
    lab = tr.label(x)
    k = weight.shape[1]
    cols = lab.reshape(-1, k)
    in_slots = tr.flow.axis_slots(weight_name, 1, k, "in")
    out_slots = tr.flow.axis_slots(weight_name, 0, weight.shape[0], "out")
    if _token_mixing(cols):
        reason = f"{what} mixes along an axis that carries positions, not units (token mixing): its weights stay in place"
        tr.flow.pin(in_slots, reason)
        tr.flow.pin(out_slots, reason)
        if bias is not None:
            tr.flow.pin(tr.label(bias) if bias_name is None else tr.flow.axis_slots(bias_name, 0, bias.shape[0], "elem"),
                        reason)
        return lab[..., :1].expand(out.shape)
    _consume(tr, cols, in_slots, what)
    _bias(tr, bias_name, bias, out_slots)
    return _broadcast_on(out_slots, out, out.dim() - 1)


def conv_labels(tr: _Tracer, x: torch.Tensor, weight_name: str, weight: torch.Tensor, bias_name: str | None,
                bias: torch.Tensor | None, groups: int, transposed: bool, out: torch.Tensor, what: str) -> torch.Tensor:
    cdim = 1 if x.dim() == weight.dim() else 0
    lab = tr.label(x)
    for d in range(x.dim()):
        if d != cdim and _varies(lab, d) and d != 0:
            raise _Unknown(f"{what} slides over positions that carry different units")
    cols = _channels_last(lab, cdim)
    c = x.shape[cdim]
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    out_channels = weight.shape[out_axis] * (groups if transposed else 1)
    if transposed and groups != 1:
        raise _Unknown(f"grouped transposed convolution {what}")
    out_slots = tr.flow.axis_slots(weight_name, out_axis, weight.shape[out_axis], "out")
    if groups == 1:
        _consume(tr, cols, tr.flow.axis_slots(weight_name, in_axis, weight.shape[in_axis], "in"), what)
    elif groups == c:  # depthwise (with a channel multiplier m): outputs c*m .. c*m+m-1 read input c
        m = out_channels // c
        _consume(tr, cols.repeat_interleave(m, dim=1), out_slots, what)
    else:  # grouped: input position i of every conv group is one unit (lock-step); outputs stay in their group
        per = c // groups
        _consume(tr, cols.reshape(-1, groups, per).reshape(-1, per),
                 tr.flow.axis_slots(weight_name, in_axis, weight.shape[in_axis], "in"), what)
        base = tr.new_tag(groups)
        tr.flow.tag(out_slots, base + torch.arange(out_channels) // (out_channels // groups))
    _bias(tr, bias_name, bias, out_slots)
    return _broadcast_on(out_slots, out, cdim)


def layer(tr: _Tracer, module: nn.Module, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Output labels of a convolution or linear layer traced as a whole."""
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    if isinstance(module, nn.Linear):
        labels = linear_labels(tr, x, f"{name}.weight", module.weight, f"{name}.bias", bias, out, name)
        _extra(tr, module, name, {"weight", "bias"}, tr.flow.axis_slots(f"{name}.weight", 0, module.out_features, "out"))
        return labels
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    labels = conv_labels(tr, x, f"{name}.weight", module.weight, f"{name}.bias", bias, module.groups, transposed, out,
                         name)
    out_axis = 1 if transposed else 0
    _extra(tr, module, name, {"weight", "bias"},
           tr.flow.axis_slots(f"{name}.weight", out_axis, module.weight.shape[out_axis], "out"))
    return labels


# ---- functional rules ----------------------------------------------------------------------------
def _param(tr: _Tracer, t: Any, what: str) -> str:
    name = tr.param_name(t) if isinstance(t, torch.Tensor) else None
    if name is None:
        raise _Unknown(f"{what} with weights computed in the forward")
    return name


@_rule("linear")
def _linear(tr: _Tracer, func, args, kwargs, out) -> None:
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    name = _param(tr, w, "linear")
    tr.set_label(out, linear_labels(tr, x, name, w, tr.param_name(b) if b is not None else None, b, out, name))


@_rule("conv1d", "conv2d", "conv3d")
def _conv(tr: _Tracer, func, args, kwargs, out) -> None:
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
    name = _param(tr, w, "convolution")
    tr.set_label(out, conv_labels(tr, x, name, w, tr.param_name(b) if b is not None else None, b, groups, False, out,
                                  name))


def _per_channel(tr: _Tracer, x: torch.Tensor, dim: int, params: list, out: torch.Tensor, what: str) -> torch.Tensor:
    """Per-channel parameters along ``dim`` of ``x`` (a norm's scale, shift and statistics)."""
    lab = tr.label(x)
    cols = _channels_last(lab, dim)
    first = None
    for p in params:
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or tr.param_name(p) is None or p.dim() != 1:
            raise _Unknown(f"{what} with per-channel tensors computed in the forward")
        slots = tr.flow.axis_slots(tr.param_name(p), 0, p.shape[0], "elem")
        _consume(tr, cols, slots, what)
        first = slots if first is None else first
    return lab if first is None else _broadcast_on(first, out, dim)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


@_rule("batch_norm", "instance_norm")
def _batch_norm(tr: _Tracer, func, args, kwargs, out) -> None:
    x = args[0]
    params = [_arg(args, kwargs, i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    tr.set_label(out, _per_channel(tr, x, 1 if x.dim() > 1 else 0, params, out, "batch norm"))


def _tag_along(tr: _Tracer, lab: torch.Tensor, dims: list[int]) -> None:
    _reduce_labels(tr, lab, dims)


@_rule("layer_norm", "rms_norm")
def _layer_norm(tr: _Tracer, func, args, kwargs, out) -> None:
    x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    lab = tr.label(x)
    _tag_along(tr, lab, list(range(x.dim() - k, x.dim())))
    names = ("weight", "bias") if getattr(func, "__name__", "") == "layer_norm" else ("weight",)
    params = [_arg(args, kwargs, 2 + i, n) for i, n in enumerate(names)]
    if k != 1 and any(p is not None for p in params):
        raise _Unknown(f"layer norm over {k} axes with a per-element scale")
    tr.set_label(out, _per_channel(tr, x, x.dim() - 1, params, out, "layer norm") if k == 1 else lab)


@_rule("group_norm")
def _group_norm(tr: _Tracer, func, args, kwargs, out) -> None:
    x, groups = args[0], _arg(args, kwargs, 1, "num_groups")
    lab = tr.label(x)
    c = x.shape[1]
    cols = _channels_last(lab, 1)
    base = tr.new_tag(groups)
    tr.flow.tag(cols, (base + torch.arange(c) // (c // groups)).expand_as(cols))
    params = [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")]
    tr.set_label(out, _per_channel(tr, x, 1, params, out, "group norm"))


@_rule("softmax", "log_softmax", "normalize")
def _softmax(tr: _Tracer, func, args, kwargs, out) -> None:
    name = getattr(func, "__name__", "")
    dim = kwargs.get("dim", args[2] if name == "normalize" and len(args) > 2 else (args[1] if len(args) > 1 else None))
    if name == "normalize" and dim is None:
        dim = 1
    lab = tr.label(args[0])
    _tag_along(tr, lab, _dims(args[0], dim))
    tr.set_label(out, lab)


@_rule("prelu")
def _prelu(tr: _Tracer, func, args, kwargs, out) -> None:
    x, w = args[0], args[1]
    tr.set_label(out, tr.label(x) if w.numel() == 1 else _per_channel(tr, x, 1 if x.dim() > 1 else 0, [w], out, "prelu"))


@_rule("embedding")
def _embedding(tr: _Tracer, func, args, kwargs, out) -> None:
    w = _arg(args, kwargs, 1, "weight")
    slots = tr.flow.axis_slots(_param(tr, w, "embedding"), 1, w.shape[1], "out")
    tr.set_label(out, _broadcast_on(slots, out, out.dim() - 1))


@_rule("glu")
def _glu(tr: _Tracer, func, args, kwargs, out) -> None:
    dim = _arg(args, kwargs, 1, "dim", -1)
    a, b = tr.label(args[0]).chunk(2, dim)
    tr.set_label(out, _combine(tr, a, b))


@_rule("setitem")
def _setitem(tr: _Tracer, func, args, kwargs, out) -> None:
    x, index, value = args[0], args[1], args[2]
    lab = tr.label(x).clone()
    lab[index] = tr.label(value) if isinstance(value, torch.Tensor) else NONE
    tr.labels[x] = lab


from . import patterns_contract  # noqa: E402,F401  (registers the matmul, einsum and attention rules)
