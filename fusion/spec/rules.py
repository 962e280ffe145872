"""Which local tensors and axes a channel permutation moves, per layer type."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .hf_layers import is_transposed_linear, transposed_linear_rule


class _Unsupported(Exception):
    """A construct for which no permutation rule is known (the group is refused)."""


@dataclass
class _AxisRule:
    """Which local tensors and axes a channel operation on one module moves."""

    tensors: list[tuple[str, int]]
    lockstep: int = 1  # >1: input of a grouped conv / GroupNorm with that many conv groups


_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _present(module: nn.Module, names: Sequence[str], axis: int) -> list[tuple[str, int]]:
    return [(n, axis) for n in names if getattr(module, n, None) is not None]


def _axis_rule(module: nn.Module, is_out: bool, name: str) -> _AxisRule:
    """The tensors/axes moved when the units on ``module``'s output (or input) are permuted."""
    # --- transformer layers (fusion.spec.hf_layers) ---
    if is_transposed_linear(module):
        return _AxisRule(transposed_linear_rule(module, is_out))
    # --- torch layers ---
    if isinstance(module, nn.Linear):
        return _AxisRule(_present(module, ["weight", "bias"], 0) if is_out else [("weight", 1)])
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise _Unsupported(f"grouped transposed convolution {name}")
        return _AxisRule([("weight", 1)] + _present(module, ["bias"], 0) if is_out else [("weight", 0)])
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if is_out:
            return _AxisRule(_present(module, ["weight", "bias"], 0))
        if module.groups == 1:
            return _AxisRule([("weight", 1)])
        if depthwise:
            return _AxisRule([], lockstep=0)  # moved by the out-channel rule of the same conv
        return _AxisRule([("weight", 1)], lockstep=module.groups)
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return _AxisRule(_present(module, _NORM_TENSORS, 0))
    if isinstance(module, nn.GroupNorm):
        return _AxisRule(_present(module, ["weight", "bias"], 0), lockstep=module.num_groups)
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise _Unsupported(f"LayerNorm {name} normalises over {tuple(module.normalized_shape)}")
        return _AxisRule(_present(module, ["weight", "bias"], 0))
    if isinstance(module, nn.PReLU):
        return _AxisRule([("weight", 0)] if module.num_parameters > 1 else [])
    if isinstance(module, nn.Embedding):
        if not is_out:
            raise _Unsupported(f"embedding {name} has no input channels")
        return _AxisRule([("weight", 1)])
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            raise _Unsupported(f"attention {name} with separate key/value dimensions")
        tensors = [("in_proj_weight", 1), ("out_proj.weight", 0)]
        if module.out_proj.bias is not None:
            tensors.append(("out_proj.bias", 0))
        return _AxisRule(tensors)
    if isinstance(module, nn.RNNBase):
        if is_out:
            raise _Unsupported(f"hidden units of recurrent layer {name}")
        return _AxisRule([(n, 1) for n in ("weight_ih_l0", "weight_ih_l0_reverse") if hasattr(module, n)])
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise _Unsupported(f"no permutation rule for {type(module).__name__} {name}")
    return _AxisRule([])
