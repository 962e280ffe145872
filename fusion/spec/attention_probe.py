"""Finding the attention layers of a model by probing what they compute.

An attention layer is found from what it computes, not from its class or parameter names: an
*output projection* is a linear layer (``nn.Linear`` or Hugging Face's transposed ``Conv1D``)
whose input is computed, through a softmax (or ``scaled_dot_product_attention``), from the
outputs of other linear layers, its *projections*. On a float64 copy with every parameter
re-drawn at O(1) scale, the Jacobian of the output projection's input columns with respect to
the projection outputs (and to any parameter read on the way, e.g. a relative-position bias
table) is measured here; :mod:`fusion.spec.attention_layout` reads the head layout off it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..checks import move_inputs, run_model
from .attention_layout import AttentionLayout, NoLayout, layout_from_dependencies, multihead_attention_layout, rotary_dims
from .hf_layers import linear_axes
from .records import SkippedGroup
from .verify import structural_copy

log = logging.getLogger(__name__)

#: Parameters read inside an attention layer above this size are not per-head tables (their
#: dependency matrices would be too large to form); they only block the within-head groups.
_MAX_TABLE = 1 << 16
_SOFTMAX_NODES = ("Softmax", "ScaledDotProduct", "FlashAttention", "EfficientAttention")


# --------------------------------------------------------------------------------------------
# A float64 copy at O(1) scale, and the Jacobian probe
# --------------------------------------------------------------------------------------------


@dataclass
class _Capture:
    module: nn.Module
    output: torch.Tensor | None = None  # a leaf standing for the module's output
    input: torch.Tensor | None = None


def _capture_linears(work: nn.Module, inputs: Any) -> dict[str, _Capture]:
    """Run ``work`` once; every linear-like module's output becomes a leaf, its input is kept.

    ``nn.Linear`` weights are caught wherever ``F.linear`` reads them, so attention code that calls
    its projections functionally (torchvision's Swin) is read like any other; other linear-like
    modules (``Conv1D``, linears with their own forward) through module hooks. The first call wins.
    """
    captures = {name: _Capture(m) for name, m in work.named_modules() if linear_axes(m) is not None}
    inside_mha = {f"{n}.{c}" for n, m in work.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for c, _ in m.named_modules() if c}
    for name in inside_mha:
        captures.pop(name, None)
    functional = {id(c.module.weight): c for c in captures.values() if type(c.module).forward is nn.Linear.forward}

    def capture(cap: _Capture, x: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or cap.output is not None:
            return None
        cap.input = x if isinstance(x, torch.Tensor) else None
        cap.output = output.detach().requires_grad_(True)
        return cap.output.clone()  # a non-leaf: the model may write into it (Falcon's fused qkv)

    class _Linears(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func in (F.linear, torch._C._nn.linear):
                weight = args[1] if len(args) > 1 else kwargs.get("weight")
                cap = functional.get(id(weight))
                if cap is not None:
                    replaced = capture(cap, args[0] if args else kwargs.get("input"), out)
                    return out if replaced is None else replaced
            return out

    handles = [c.module.register_forward_hook(lambda m, a, out, c=c: capture(c, a[0] if a else None, out))
               for c in captures.values() if id(c.module.weight) not in functional]
    try:
        with torch.enable_grad(), _Linears():
            run_model(work, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {n: c for n, c in captures.items() if c.output is not None}


def _graph_leaves(root: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
    """The leaf tensors (captured outputs, parameters) the autograd graph of ``root`` reads, and
    whether it passes a softmax-like node."""
    leaves, seen, stack, softmax = [], set(), [root.grad_fn], False
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        name = fn.name()
        softmax = softmax or any(s in name for s in _SOFTMAX_NODES)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            leaves.append(variable)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves, softmax


def _dependencies(root: torch.Tensor, leaves: Sequence[torch.Tensor], activations: int) -> list[torch.Tensor]:
    """Which columns (last axis) of ``root`` depend on which leaf entries, as bool matrices.

    The first ``activations`` leaves are activations: their entries are their features (last
    axis, summed over batch and positions), giving ``(columns, features)``; the other leaves are
    parameters, giving ``(columns, *shape)``. Dependencies are exact zeros of batched gradients.
    """
    columns = root.shape[-1]
    chunk = max(1, min(64, (1 << 21) // max(1, root.numel())))  # columns per batched backward (memory)
    shapes = [(leaf.shape[-1],) if i < activations else tuple(leaf.shape) for i, leaf in enumerate(leaves)]
    deps = [torch.zeros((columns,) + shape, dtype=torch.bool) for shape in shapes]
    for start in range(0, columns, chunk):
        n = min(columns, start + chunk) - start
        basis = torch.zeros((n, root[..., 0].numel(), columns), dtype=root.dtype, device=root.device)
        basis[torch.arange(n), :, torch.arange(start, start + n)] = 1.0
        basis = basis.reshape((n,) + tuple(root.shape))
        grads = torch.autograd.grad(root, list(leaves), basis, retain_graph=True, allow_unused=True,
                                    is_grads_batched=True)
        for i, (dep, grad) in enumerate(zip(deps, grads)):
            if grad is None:
                continue
            g = grad.abs()
            if i < activations:
                g = g.reshape(n, -1, g.shape[-1]).sum(1)
            dep[start:start + n] = (g > 0).reshape((n,) + shapes[i]).cpu()
    return deps


# --------------------------------------------------------------------------------------------
# Finding the layouts of a model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSearch:
    """Attention layers found in a model, and attention-like layers that could not be read."""

    layouts: tuple[AttentionLayout, ...]
    refused: tuple[SkippedGroup, ...]

    @property
    def cut_outputs(self) -> set[str]:
        """Modules whose outputs are head dimensions (the projections)."""
        return {p for lay in self.layouts for p in lay.producers if p not in lay.consumers}

    @property
    def cut_inputs(self) -> set[str]:
        """Modules whose inputs are head dimensions (the output projections)."""
        return {c for lay in self.layouts for c in lay.consumers if c not in lay.producers}

    @property
    def internal_axes(self) -> set[tuple[str, int]]:
        return {a for lay in self.layouts for a in lay.internal_axes}


def find_attention(model: nn.Module, example_inputs: Any, canonical: dict[str, str], seed: int = 0) -> AttentionSearch:
    """The attention layers of ``model`` with their head layouts, read off a structural copy."""
    layouts, refused = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            layout = multihead_attention_layout(name, module, canonical)
            if layout is None:
                refused.append(SkippedGroup(name, module.num_heads, "attention with separate key/value dimensions"))
            else:
                layouts.append(layout)
    has_linear = any(linear_axes(m) is not None for m in model.modules() if not isinstance(m, nn.MultiheadAttention))
    if not has_linear:
        return AttentionSearch(tuple(layouts), tuple(refused))
    from ..checks import model_device

    try:
        work = structural_copy(model, seed)
        for p in work.parameters():
            p.requires_grad_(True)  # frozen per-head tables must show their dependencies too
        captures = _capture_linears(work, move_inputs(example_inputs, model_device(work), torch.float64))
    except Exception as exc:  # no float64 copy (a lock, float32-only code): only nn.MultiheadAttention's layouts
        with torch.no_grad():
            run_model(model, example_inputs)  # raises ExampleInputError if the inputs are at fault
        log.warning("no attention layouts read from %s: %s: %s", type(model).__name__, type(exc).__name__, exc)
        return AttentionSearch(tuple(layouts), tuple(refused))
    by_leaf = {id(c.output): n for n, c in captures.items()}
    param_names = {id(p): n for n, p in work.named_parameters()}
    rotary = rotary_dims(work)
    mha_params = {id(p) for m in work.modules() if isinstance(m, nn.MultiheadAttention) for p in m.parameters()}
    modules = dict(model.named_modules())
    for out_name, cap in captures.items():
        if cap.input is None or cap.input.grad_fn is None:
            continue
        leaves, softmax = _graph_leaves(cap.input)
        proj_leaves = [leaf for leaf in leaves if id(leaf) in by_leaf]
        if not softmax or not proj_leaves:
            continue
        params = [leaf for leaf in leaves if id(leaf) in param_names]
        if any(id(leaf) in mha_params for leaf in params):
            continue  # the softmax is an nn.MultiheadAttention's, whose layout comes from the module
        big = [param_names[id(leaf)] for leaf in params if leaf.numel() > _MAX_TABLE]
        params = [leaf for leaf in params if leaf.numel() <= _MAX_TABLE]
        deps = _dependencies(cap.input, proj_leaves + params, len(proj_leaves))
        projections = [(by_leaf[id(leaf)], modules[by_leaf[id(leaf)]], dep) for leaf, dep in zip(proj_leaves, deps)]
        projections.sort(key=lambda x: list(modules).index(x[0]))
        name = _common_prefix([p for p, _, _ in projections] + [out_name])
        tables, others = [], []
        for leaf, dep in zip(params, deps[len(proj_leaves):]):
            if not bool(dep.any()):
                continue
            (tables if any(s > 1 for s in leaf.shape) and leaf.dim() >= 2 else others).append((param_names[id(leaf)], dep))
        try:
            layout = layout_from_dependencies(
                name, out_name, modules[out_name], [(k, modules[k], d) for k, _, d in projections], tables,
                [n for n, _ in others] + big, canonical, rotary)
        except NoLayout as exc:
            size = int(cap.input.shape[-1])
            layer = out_name.rsplit(".", 1)[0]
            refused.append(SkippedGroup(f"{layer}.heads", size, f"attention layout not recognised from the projections "
                                        f"called as modules before {out_name}: {exc}"))
            continue
        layouts.append(layout)
    return AttentionSearch(tuple(layouts), tuple(refused))


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix) or names[0]
