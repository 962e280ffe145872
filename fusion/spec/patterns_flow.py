"""Channel flow: which tensor axes carry the same hidden unit, traced op by op.

torch-pruning maps channels through a fixed catalogue of index mappings; splits into parts of
different kernels, ghost modules (concatenate then slice), channel shuffles, window partitions and
patch merging fall outside it. This tracer follows channels through *any* data-movement operation
by running the operation itself on a *label tensor*: every activation element carries the id of the
unit ("slot") it holds, and ``view``/``permute``/``cat``/``split``/``__getitem__``/``roll``/``pad``...
applied to the labels move them exactly as they move the data.

Slots are the positions of parameter axes (a weight's output rows, its input columns, a norm's
scale). A union-find joins the slots that one permutation must move together:

* an elementwise operation joins the labels that meet at the same element (residual adds, gates);
* a layer reading a channel axis joins its input-axis slots with the labels found there; its
  output carries its output-axis slots;
* a contraction between two activations (attention) joins the contracted labels and tags every unit
  with the batch coordinates (heads) it was contracted at, so units of different heads never share a
  group; normalisations over several channels tag their units the same way (a GroupNorm's groups);
* anything unknown, the model's inputs and its outputs *pin* the slots they touch (slot 0).

Convolutions and linear layers are traced as whole modules (hooks), so a weight computed inside the
module (weight standardisation) is still read through the module's parameters; an extra parameter
with one entry per output channel (a standardised convolution's ``gain``) moves with the output
channels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from ..checks import run_model
from ..errors import TraceError

FIXED = 0  # the slot of everything that must stay in place
OUTPUT_REASON = "its units are the model's output"
NONE = -1  # label of an element that carries no unit (constants, reductions over units)

_MOVE = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "swapdims", "t", "expand",
    "expand_as", "repeat", "tile", "squeeze", "unsqueeze", "narrow", "getitem", "split", "split_with_sizes", "chunk",
    "tensor_split", "unbind", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "roll", "flip", "movedim",
    "moveaxis", "select", "index_select", "view_as", "reshape_as", "unfold", "pixel_shuffle", "pixel_unshuffle",
    "channel_shuffle", "get", "repeat_interleave", "gather", "take_along_dim", "pad", "diagonal",
}
_SAME = {"to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous", "clone", "detach", "cpu", "cuda",
         "softmax", "log_softmax", "requires_grad_", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
         "feature_alpha_dropout", "identity"}
_ELEMENTWISE = {
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide", "remainder", "fmod",
    "pow", "radd", "rsub", "rmul", "rtruediv", "rdiv", "rpow", "truediv", "iadd", "isub", "imul", "itruediv", "neg",
    "abs", "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu",
    "elu", "selu", "celu", "softplus", "softsign", "mish", "exp", "log", "log1p", "sqrt", "rsqrt", "clamp", "clip",
    "clamp_min", "clamp_max", "where", "maximum", "minimum", "erf", "sin", "cos", "masked_fill", "lerp", "addcmul",
    "addcdiv", "sign", "reciprocal", "square", "floor", "ceil", "round", "trunc", "logsigmoid", "threshold", "eq",
    "ne", "gt", "lt", "floordiv", "rfloordiv", "mod", "rmod",
    "ge", "le", "and", "or", "mul_", "sigmoid_", "tanh_", "hardtanh_", "erfc", "expm1", "exp2",
    "silu_", "relu_", "gelu_", "leaky_relu_", "elu_", "hardswish_", "hardsigmoid_", "add_", "sub_", "div_",
    "clamp_", "clamp_min_", "masked_fill_", "neg_", "sqrt_", "pow_", "addcmul_", "copy_", "fill_", "zero_",
}
_CREATE = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones",
           "new_empty", "new_full", "new_tensor", "arange", "size", "dim", "numel", "shape", "dtype", "device",
           "isfinite", "isnan", "any", "all", "item", "tolist", "argmax", "argmin", "argsort"}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm", "prod", "nansum",
           "nanmean", "median", "std_mean", "var_mean"}
_POOL = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_avg_pool1d",
         "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
         "adaptive_max_pool3d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "lp_pool2d",
         "lp_pool1d", "max_pool2d_with_indices", "adaptive_max_pool2d_with_indices", "avg_pool"}


def _op_name(func: Callable) -> str:
    name = getattr(func, "__name__", "") or ""
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    return name


@dataclass
class Slots:
    """One parameter axis: its slots are ``start .. start + size - 1``; ``role`` is out, in or elem."""

    name: str
    axis: int
    start: int
    size: int
    role: str


@dataclass
class Flow:
    """The outcome of tracing: parameter-axis slots, their union-find, pins and tags."""

    slots: list[Slots] = field(default_factory=list)
    parent: list[int] = field(default_factory=lambda: [FIXED])
    tags: dict[int, set] = field(default_factory=lambda: defaultdict(set))  # slot -> tags
    pin_reason: dict[int, str] = field(default_factory=dict)  # slot -> why it was pinned first
    by_axis: dict[tuple[str, int], Slots] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)  # why slots were pinned by an operation without a rule

    def find(self, s: int) -> int:
        parent = self.parent
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb == FIXED:
                ra, rb = rb, ra
            self.parent[rb] = ra  # FIXED stays a root

    def axis_slots(self, name: str, axis: int, size: int, role: str) -> torch.Tensor:
        found = self.by_axis.get((name, axis))
        if found is None:
            found = Slots(name, axis, len(self.parent), size, role)
            self.parent.extend(range(found.start, found.start + size))
            self.slots.append(found)
            self.by_axis[(name, axis)] = found
        elif role == "out" and found.role != "out":
            found.role = "out"
        return torch.arange(found.start, found.start + found.size)

    def join(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union elementwise (broadcast) wherever both labels are slots."""
        a, b = torch.broadcast_tensors(a, b)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not bool(keep.any()):
            return
        m = len(self.parent)
        for code in torch.unique(a[keep] * m + b[keep]).tolist():  # one code per distinct pair (1-D unique is fast)
            self.union(code // m, code % m)

    def pin(self, labels: torch.Tensor, reason: str) -> None:
        for s in torch.unique(labels[labels > FIXED]).tolist():
            self.pin_reason.setdefault(s, reason)
            self.union(FIXED, s)

    def tag(self, labels: torch.Tensor, tags: torch.Tensor) -> None:
        """Tag each slot in ``labels`` with the matching entry of ``tags`` (same shape)."""
        keep = labels >= 0
        if not bool(keep.any()):
            return
        kept_tags = tags.expand_as(labels)[keep]
        m = int(kept_tags.max()) + 1
        for code in torch.unique(labels[keep] * m + kept_tags).tolist():
            self.tags[code // m].add(code % m)


class _Unknown(Exception):
    pass


class _Tracer(TorchFunctionMode):
    """Follows unit labels through one forward pass of the model."""

    def __init__(self, model: nn.Module, unwrapped: dict[str, int] | None):
        super().__init__()
        self.flow = Flow()
        self.labels: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.params = {}
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
            self.params.setdefault(id(t), (name, t))
        self.unwrapped = unwrapped or {}
        self.depth = 0  # >0 inside a module traced as a whole
        self.ops = 0
        self.next_tag = 1

    def new_tag(self, n: int) -> int:
        """The first of ``n`` fresh tag values."""
        base, self.next_tag = self.next_tag, self.next_tag + n
        return base

    # ---- labels of tensors -------------------------------------------------------------------
    def param_name(self, t: Any) -> str | None:
        entry = self.params.get(id(t))
        return entry[0] if entry is not None and entry[1] is t else None

    def label(self, t: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        """Labels of ``t``; a parameter gets slots along ``axis`` (default: its channel-like axis)."""
        found = self.labels.get(t)
        if found is not None:
            return found
        name = self.param_name(t)
        if name is None or t.dim() == 0:
            return torch.full(t.shape, NONE, dtype=torch.long)
        if axis is None:
            axis = self.unwrapped.get(name, max((i for i in range(t.dim()) if t.shape[i] > 1), default=t.dim() - 1))
        slots = self.flow.axis_slots(name, axis % t.dim(), t.shape[axis], "elem")
        shape = [1] * t.dim()
        shape[axis] = -1
        return slots.reshape(shape).expand(t.shape)

    def set_label(self, out: Any, labels: Any) -> None:
        if isinstance(out, torch.Tensor):
            if isinstance(labels, torch.Tensor) and tuple(labels.shape) == tuple(out.shape):
                self.labels[out] = labels
            else:
                self.labels[out] = torch.full(out.shape, FIXED, dtype=torch.long)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                lab = labels[i] if isinstance(labels, (tuple, list)) and i < len(labels) else labels
                self.set_label(o, lab)

    def pin_all(self, args: Any, reason: str) -> None:
        for t in _tensors(args):
            self.flow.pin(self.label(t), reason)

    # ---- the mode ----------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if self.depth or (not _tensors(out) and name != "setitem"):
            return out
        self.ops += 1
        try:
            self.record(name, func, args, kwargs, out)
        except Exception as exc:  # any rule that cannot apply pins what it touched
            reason = f"read by {name} ({type(exc).__name__}: {exc})" if not isinstance(exc, _Unknown) else str(exc)
            self.pin_all((args, kwargs), reason)
            self.flow.events.append(reason)
            self.set_label(out, None)
        return out

    def record(self, name: str, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        from . import patterns_ops as ops

        rule = ops.RULES.get(name)
        if rule is not None:
            rule(self, func, args, kwargs, out)
        elif name in _MOVE:
            ops.move(self, func, args, kwargs, out)
        elif name in _SAME or name.endswith("dropout"):
            self.set_label(out, self.label(args[0]) if isinstance(args[0], torch.Tensor) else None)
        elif name in _ELEMENTWISE or (name.endswith("_") and name[:-1] in _ELEMENTWISE):
            ops.elementwise(self, args, kwargs, out, inplace=name.endswith("_") or name.startswith("i"))
        elif name in _CREATE:
            self.set_label(out, _none_like(out))
        elif name in _REDUCE:
            ops.reduce(self, func, args, kwargs, out)
        elif name in _POOL:
            ops.pool(self, args, out)
        else:
            raise _Unknown(f"read by {name}, which has no channel rule")

    # ---- modules traced as a whole -----------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self.depth == 0:
            module._fusion_flow_input = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.depth += 1

    def post_hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        from . import patterns_ops as ops

        self.depth -= 1
        if self.depth:
            return
        x = module.__dict__.pop("_fusion_flow_input", None)
        name = self.module_names[module]
        self.depth += 1  # the rule's own tensor operations are not part of the model
        try:
            if x is None or not isinstance(out, torch.Tensor):
                raise _Unknown(f"module {name} called without one tensor input")
            self.set_label(out, ops.layer(self, module, name, x, out))
        except Exception as exc:
            reason = str(exc) if isinstance(exc, _Unknown) else f"{name}: {type(exc).__name__}: {exc}"
            self.pin_all((args, out), reason)
            self.flow.events.append(reason)
            for pname, p in module.named_parameters():
                for axis in range(min(p.dim(), 2)):
                    self.flow.pin(self.flow.axis_slots(f"{name}.{pname}", axis, p.shape[axis], "elem"), reason)
            self.set_label(out, None)
        finally:
            self.depth -= 1


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _none_like(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return torch.full(out.shape, NONE, dtype=torch.long)
    if isinstance(out, (list, tuple)):
        return type(out)(_none_like(o) for o in out) if not hasattr(out, "_fields") else [_none_like(o) for o in out]
    return None


#: Modules traced as a whole: the parameters they read are their own, whatever the forward computes.
WHOLE = (nn.modules.conv._ConvNd, nn.Linear)


def trace_flow(model: nn.Module, example_inputs: Any, unwrapped: dict[str, int] | None = None) -> Flow:
    """Run ``model`` once on ``example_inputs`` and return the channel flow of its parameters."""
    tracer = _Tracer(model, unwrapped)
    tracer.module_names = {}
    handles = []
    canonical_module: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        canonical_module.setdefault(id(module), name)
        if isinstance(module, WHOLE) and module not in tracer.module_names:
            tracer.module_names[module] = canonical_module[id(module)]
            handles.append(module.register_forward_pre_hook(tracer.pre_hook))
            handles.append(module.register_forward_hook(tracer.post_hook))
    for t in _tensors(example_inputs):
        tracer.labels[t] = torch.full(t.shape, FIXED, dtype=torch.long)
    try:
        with torch.no_grad(), tracer:
            out = run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for module in tracer.module_names:
            module.__dict__.pop("_fusion_flow_input", None)
    outputs = _tensors(out if not hasattr(out, "items") else list(out.values()))
    if not outputs:
        raise TraceError(f"{type(model).__name__} returns no tensor, so its outputs cannot be traced")
    for t in outputs:
        tracer.flow.pin(tracer.label(t), OUTPUT_REASON)
    return tracer.flow
