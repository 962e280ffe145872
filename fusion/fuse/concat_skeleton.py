"""The wide skeleton of a concatenation: which tensor axes grow ``N`` times, and member 0 at that width.

A grouped axis is widened ``N`` times, except a grouped convolution's per-group input axis (the wide
convolution has ``N`` times as many groups instead). :func:`_traced_skeleton` copies member 0 with
uninitialised widened tensors (module attributes follow, see :func:`~fusion.fuse.layers.resize_tensors`)
and traces its permutation spec, on the meta device where the model allows it. :func:`probe_forward`
runs a resized model once, fitting norms without parameters to their new width and naming the layer
that fails; pruning back (:mod:`fusion.fuse.transplant_prune`) probes its result the same way.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..checks import eval_mode, model_device, move_inputs, run_model
from ..errors import ConcatError, FusionError
from ..spec import PermutationSpec, permutation_spec
from .layers import owner_of, resize_tensors

__all__ = ["probe_forward"]

log = logging.getLogger(__name__)


def _in_group_axis(model: nn.Module, key: str, axis: int) -> bool:
    """Whether ``(key, axis)`` is the per-group input axis of a grouped convolution (never widened:
    the wide convolution has ``N`` times as many groups instead)."""
    _, module, local = owner_of(model, key)
    return isinstance(module, _ConvNd) and not module.transposed and module.groups > 1 and local == "weight" \
        and axis == 1


def _widened_axes(model: nn.Module, spec: PermutationSpec) -> dict[str, set[int]]:
    widened: dict[str, set[int]] = defaultdict(set)
    for group in spec.groups:
        for member in group.members:
            if not _in_group_axis(model, member.name, member.axis):
                widened[member.name].add(member.axis)
    return dict(widened)


def _wide_shape(shape: torch.Size, axes: set[int], count: int) -> tuple[int, ...]:
    return tuple(n * count if a in axes else n for a, n in enumerate(shape))


def _unwrapped(model: nn.Module, spec: PermutationSpec) -> dict[str, int] | None:
    """Parameters outside modules that produce units (class tokens, positional embeddings), with their axis."""
    params = dict(model.named_parameters())
    found = {}
    for group in spec.groups:
        for member in group.members:
            if member.name in params and member.name in group.producers:
                found[member.name] = member.axis
    return found or None


def _traced_skeleton(
    model: nn.Module, spec: PermutationSpec, widened: dict[str, set[int]], count: int, inputs: Any
) -> tuple[nn.Module, PermutationSpec]:
    """A copy of ``model`` with widened tensors (uninitialised, on ``model``'s device) and its spec.

    The skeleton is traced on the meta device, so that neither it nor the copy that
    :func:`~fusion.permutation_spec` makes takes memory; models that cannot run on the meta device
    are traced with real (zero) tensors instead.
    """
    device = model_device(model)
    for trace_device in (torch.device("meta"), device):
        wide = _meta_copy(model) if trace_device.type == "meta" else copy.deepcopy(model)
        state = wide.state_dict()
        try:
            resize_tensors(wide, {key: torch.zeros(_wide_shape(state[key].shape, axes, count), dtype=state[key].dtype,
                                                   device=trace_device) for key, axes in widened.items()})
        except ValueError as exc:
            raise ConcatError(f"cannot widen the model: {exc}") from exc
        try:
            probe_forward(wide, move_inputs(inputs, trace_device))
            wide_spec = permutation_spec(wide, inputs, verify=False, unwrapped_parameters=_unwrapped(model, spec))
        except (FusionError, NotImplementedError, RuntimeError) as exc:  # meta tensors hold no data to probe
            if trace_device == device:
                raise
            log.debug("tracing the widened model on the meta device failed (%s); tracing real tensors", exc)
            continue
        if trace_device != device:
            wide.to_empty(device=device)  # every tensor is then written by _fill
        return wide, wide_spec
    raise AssertionError("unreachable")


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the meta device (their data is never copied)."""
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


# --------------------------------------------------------------------------------------------
# Running a resized model
# --------------------------------------------------------------------------------------------


def probe_forward(model: nn.Module, inputs: Any) -> None:
    """Run ``model`` once (eval mode, no grad), fitting norms without parameters to their input width.

    GroupNorm and LayerNorm layers without affine parameters have no tensor that tells their width;
    they are given the channel count they receive (GroupNorm keeps its channels per group).

    Raises:
        ConcatError: the model fails, naming the innermost layer that was running.
    """
    running: list[str] = []
    handles = []

    def before(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            running.append(name)
            if args and isinstance(args[0], torch.Tensor):
                _fit_shapeless_norm(module, args[0], name)

        return hook

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        running.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(before(name)))
        handles.append(module.register_forward_hook(after))
    try:
        with torch.no_grad(), eval_mode(model):
            run_model(model, inputs)
    except Exception as exc:  # the model's own code may raise anything
        layer = running[-1] if running else type(model).__name__
        cause = exc.__cause__ or exc
        raise ConcatError(f"the resized {type(model).__name__} fails in layer {layer!r}: {cause}") from exc
    finally:
        for handle in handles:
            handle.remove()


def _fit_shapeless_norm(module: nn.Module, x: torch.Tensor, name: str) -> None:
    if isinstance(module, nn.GroupNorm) and module.weight is None and x.dim() > 1:
        channels = int(x.shape[1])
        if channels != module.num_channels:
            per_group = module.num_channels // module.num_groups
            if channels % per_group:
                raise ValueError(f"GroupNorm {name}: {channels} channels are not a multiple of {per_group} per group")
            module.num_groups, module.num_channels = channels // per_group, channels
    elif isinstance(module, nn.LayerNorm) and module.weight is None and len(module.normalized_shape) == 1:
        if int(x.shape[-1]) != module.normalized_shape[0]:
            module.normalized_shape = (int(x.shape[-1]),)
