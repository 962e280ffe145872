"""Writing the members into the wide skeleton of a concatenation.

Every member's tensors are copied to its block (the position tables of :mod:`fusion.fuse.concat_groups`);
the output layer's weights, which read widened units but write the model's (not widened) output, are
scaled by the member's weight, so that the wide model computes the weighted mean of the members.
Tensors without a widened axis are averaged, once :func:`_check_shared_tensors` has made sure they
are equal in all members or belong to the output layer. Norms over a widened axis then normalise
each member's slice separately: a LayerNorm becomes a :class:`~fusion.fuse.layers.BlockLayerNorm`,
an RMSNorm or other channel norm a :class:`~fusion.fuse.layers.BlockNorm`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..errors import ConcatError
from ..spec import PermutationSpec
from .concat_groups import block_index
from .layers import BlockLayerNorm, BlockNorm, is_channel_norm, owner_of, set_submodule


def _output_axis(module: nn.Module, local: str) -> int | None:
    """The axis of a layer's weight that indexes its outputs (None for other tensors)."""
    if local != "weight":
        return None
    if isinstance(module, _ConvNd):
        return 1 if module.transposed else 0
    if isinstance(module, nn.Linear):
        return 0
    if isinstance(module, nn.Embedding):
        return 1
    return None


def _canonical(model: nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    return {key: first.setdefault(id(t), key) for key, t in model.state_dict(keep_vars=True).items()}


def _scaled_tensors(model: nn.Module, widened: dict[str, set[int]]) -> set[str]:
    """Canonical keys of weights that read widened units but write units that are not widened (the
    output layer): the members' blocks are placed side by side and scaled by their weight."""
    decisions: dict[str, tuple[bool, str]] = {}
    for key, canonical in _canonical(model).items():
        _, module, local = owner_of(model, key)
        axes = widened.get(canonical, set())
        out = _output_axis(module, local)
        scaled = bool(axes) and out is not None and out not in axes
        if canonical in decisions and decisions[canonical][0] != scaled:
            other = decisions[canonical][1]
            raise ConcatError(
                f"{key!r} and {other!r} are one tied tensor, but one layer writes the members' units with it "
                f"and the other reads them to produce the model's output; a concatenation cannot keep both exact"
            )
        decisions.setdefault(canonical, (scaled, key))
    return {key for key, (scaled, _) in decisions.items() if scaled}


def _check_shared_tensors(
    models: Sequence[nn.Module], spec: PermutationSpec, widened: dict[str, set[int]], scaled: set[str]
) -> None:
    """Raise unless every tensor that all members would share (no widened axis) is either equal in
    all members or belongs to an output layer, whose bias is then averaged exactly."""
    output_modules = {key.rpartition(".")[0] for key in scaled}
    states = [m.state_dict() for m in models]
    for key, tensor in states[0].items():
        module_name = key.rpartition(".")[0]
        if key in widened or not tensor.is_floating_point() or module_name in output_modules:
            continue
        if all(torch.equal(tensor, s[key]) for s in states[1:]):
            continue
        reasons = [f"{s.name}: {s.reason}" for s in spec.skipped if s.name.split("[")[0] == module_name]
        why = f" (the permutation spec skipped {'; '.join(reasons)})" if reasons else ""
        raise ConcatError(
            f"layer {module_name or type(models[0]).__name__!r}: {key!r} of shape {tuple(tensor.shape)} has no axis in "
            f"a permutation group, so the concatenated model would have to share it between members, and the "
            f"members' values differ{why}"
        )


def _copy_non_persistent_buffers(wide: nn.Module, model: nn.Module) -> None:
    """Buffers outside the state dict (never widened) are copied from ``model``."""
    keys = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name not in keys and buffer is not None:
            _, module, local = owner_of(wide, name)
            module._buffers[local] = buffer.clone()


def _fill(
    wide: nn.Module,
    models: Sequence[nn.Module],
    maps: dict[tuple[str, int], torch.Tensor],
    widened: dict[str, set[int]],
    scaled: set[str],
    weights: Sequence[float],
) -> None:
    states = [m.state_dict() for m in models]
    canonical = _canonical(wide)
    with torch.no_grad():
        _copy_non_persistent_buffers(wide, models[0])
        for key, target in wide.state_dict().items():
            if canonical[key] != key:
                continue  # tied: written through its first name
            axes = widened.get(key)
            if not axes:
                if target.is_floating_point():
                    target.copy_(sum(w * s[key] for w, s in zip(weights, states)))
                else:
                    target.copy_(states[0][key])
                continue
            if len(axes) > 1:  # the members' blocks do not cover the tensor: the rest is zero
                target.zero_()
            for k, state in enumerate(states):
                source = state[key] * weights[k] if key in scaled else state[key]
                index = block_index(maps, key, target.dim(), k)
                if all(isinstance(i, slice) for i in index):
                    target[index] = source
                else:  # scattered positions: one broadcast index tensor per axis
                    grids = []
                    for a, i in enumerate(index):
                        view = [1] * target.dim()
                        view[a] = -1
                        positions = torch.arange(target.shape[a])[i] if isinstance(i, slice) else i
                        grids.append(positions.to(target.device).view(view))
                    target[tuple(grids)] = source


# --------------------------------------------------------------------------------------------
# Norms over a widened axis
# --------------------------------------------------------------------------------------------


def _use_block_layer_norms(
    wide: nn.Module, member: nn.Module, maps: dict[tuple[str, int], torch.Tensor]
) -> dict[str, nn.Module]:
    """Replace every LayerNorm whose axis was widened by a BlockLayerNorm over the members' slices.

    Returns:
        Name -> the member's LayerNorm, for each replaced layer.
    """
    member_modules = dict(member.named_modules())
    replaced = {}
    for name, module in list(wide.named_modules()):
        if isinstance(module, (BlockLayerNorm, BlockNorm)) or not (isinstance(module, nn.LayerNorm)
                                                                   or is_channel_norm(module)):
            continue
        original = member_modules[name]
        if not isinstance(module, nn.LayerNorm):  # RMSNorm and other channel norms: a generic block norm
            if module.weight.shape != original.weight.shape:
                _check_contiguous(maps, name)
                count = module.weight.shape[0] // original.weight.shape[0]
                set_submodule(wide, name, BlockNorm(original, module.weight, getattr(module, "bias", None), count))
                replaced[name] = original
            continue
        if tuple(module.normalized_shape) == tuple(original.normalized_shape):
            continue
        if len(original.normalized_shape) != 1:
            raise ConcatError(f"LayerNorm {name!r} normalises over {tuple(original.normalized_shape)}; only "
                              f"LayerNorms over one axis can be concatenated")
        block = original.normalized_shape[0]
        _check_contiguous(maps, name)
        set_submodule(wide, name, BlockLayerNorm.from_layer_norm(module, block))
        replaced[name] = original
    return replaced


def _check_contiguous(maps: dict[tuple[str, int], torch.Tensor], name: str) -> None:
    table = maps.get((f"{name}.weight", 0))
    if table is not None:
        expected = torch.arange(table.numel()).view(table.shape)
        if not torch.equal(table.sort(dim=1).values, expected):
            raise ConcatError(f"norm {name!r}: the members' features are not contiguous slices of the "
                              f"concatenated axis, so they cannot be normalised separately")
