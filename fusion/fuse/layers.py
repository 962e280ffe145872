"""Layer surgery for models whose hidden widths change: a block-wise LayerNorm and tensor resizing.

Concatenating ``N`` ensemble members into one wide model and pruning it back (Neuron
Transplantation, Öz et al., ECML 2024) both replace tensors of an existing model by tensors of
another width. :func:`resize_tensors` does that by state-dict key and keeps every module
consistent with its new tensors (``in_features``, ``out_channels``, ``groups`` of grouped
convolutions, ``num_groups`` of GroupNorm, ``embed_dim``/``num_heads`` of attention, ...).

:class:`BlockLayerNorm` normalises each member's slice of a concatenated feature axis on its own,
which a plain ``nn.LayerNorm`` over the whole widened axis cannot do: it is what keeps the wide
model of a transformer equal to the mean of its members.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["BlockLayerNorm", "WIDTH_ATTRIBUTES", "owner_of", "resize_tensors", "set_submodule"]

log = logging.getLogger(__name__)

#: Integer attributes of custom modules that hold a width (updated by :func:`resize_tensors` when a
#: tensor owned by such a module changes length from the attribute's value; e.g. torchvision's
#: ``VisionTransformer.hidden_dim``, which its forward uses to reshape the patch embedding).
WIDTH_ATTRIBUTES = ("hidden_dim", "embed_dim", "d_model", "hidden_size", "width", "dim")


class BlockLayerNorm(nn.LayerNorm):
    """LayerNorm applied separately to ``num_blocks`` consecutive slices of the last dimension.

    With ``num_blocks=1`` it is ``nn.LayerNorm(block_size)``. A concatenation of ``N`` models that
    each end in ``nn.LayerNorm(d)`` needs ``BlockLayerNorm(d, N)``: each member's ``d`` features are
    normalised with their own mean and variance, so the wide model still computes every member.

    Args:
        block_size: features per block (the members' normalised width ``d``).
        num_blocks: number of blocks; the layer normalises the last ``block_size * num_blocks`` features.
        eps, elementwise_affine, bias, device, dtype: as for ``nn.LayerNorm``; ``weight`` and ``bias``
            have shape ``(block_size * num_blocks,)``.

    Shapes:
        ``(*, block_size * num_blocks)`` -> same shape.
    """

    def __init__(
        self,
        block_size: int,
        num_blocks: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"block_size and num_blocks must be positive, got {block_size} and {num_blocks}")
        super().__init__(block_size * num_blocks, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.block_size = block_size
        self.num_blocks = num_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.unflatten(-1, (self.num_blocks, self.block_size))
        out = F.layer_norm(blocks, (self.block_size,), None, None, self.eps).flatten(-2)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm, block_size: int) -> BlockLayerNorm:
        """A block-wise copy of ``norm`` (a LayerNorm over one axis whose length is a multiple of ``block_size``).

        The new layer shares ``norm``'s parameters.
        """
        (width,) = norm.normalized_shape
        if width % block_size:
            raise ValueError(f"LayerNorm width {width} is not a multiple of block_size {block_size}")
        weight = norm.weight if norm.weight is not None else None
        block = cls(block_size, width // block_size, eps=norm.eps, elementwise_affine=False)
        block.elementwise_affine = norm.elementwise_affine
        block.weight, block.bias = weight, norm.bias
        block.train(norm.training)
        return block

    def to_layer_norm(self) -> nn.LayerNorm:
        """A plain ``nn.LayerNorm`` over the whole axis that shares this layer's parameters.

        It computes another function when ``num_blocks > 1`` but has the same parameters and
        channel coupling, which is what dependency tracing and pruning need.
        """
        norm = nn.LayerNorm(self.normalized_shape, eps=self.eps, elementwise_affine=False)
        norm.elementwise_affine = self.elementwise_affine
        norm.weight, norm.bias = self.weight, self.bias
        norm.train(self.training)
        return norm

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, num_blocks={self.num_blocks}, " + super().extra_repr()


def owner_of(model: nn.Module, key: str) -> tuple[str, nn.Module, str]:
    """``(module name, module, local name)`` of the parameter or buffer called ``key``."""
    module_name, _, local = key.rpartition(".")
    return module_name, model.get_submodule(module_name), local


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (e.g. ``"encoder.ln"``) by ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """For every state-dict key, all keys that hold the very same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(tensor), []).append(key)
    return {key: keys for keys in by_id.values() for key in keys}


def resize_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Replace parameters/buffers of ``model`` (in place) by tensors of possibly other shapes.

    Tied tensors (one parameter under several keys) are replaced everywhere they appear; new
    parameters keep ``requires_grad``. Afterwards every module that owns a replaced tensor has its
    shape attributes updated from its new tensors (see the module docstring).

    Args:
        model: the model to modify.
        tensors: state-dict key -> new tensor.

    Raises:
        ValueError: a new width is incompatible with a module's structure (e.g. not a multiple of
            a grouped convolution's channels per group).
    """
    aliases = _aliases(model)
    state = model.state_dict(keep_vars=True)
    old_shapes: dict[str, dict[str, torch.Size]] = {}
    done: set[str] = set()
    for key, new in tensors.items():
        if key in done:
            continue
        if key not in state:
            raise KeyError(f"the model has no parameter or buffer {key!r}")
        old = state[key]
        is_parameter = isinstance(old, nn.Parameter)
        replacement = nn.Parameter(new.detach(), requires_grad=old.requires_grad) if is_parameter else new
        for alias in aliases[key]:
            module_name, module, local = owner_of(model, alias)
            old_shapes.setdefault(module_name, {})[local] = old.shape
            if is_parameter:
                module._parameters[local] = replacement
            else:
                module._buffers[local] = replacement
            done.add(alias)
    for module_name, shapes in old_shapes.items():
        _sync_module(model.get_submodule(module_name), shapes, module_name)


def _scaled_count(count: int, old_width: int, new_width: int, what: str, name: str) -> int:
    """``count`` scaled like a width going from ``old_width`` to ``new_width``, keeping ``old_width / count``."""
    per = old_width // count
    if new_width % per:
        raise ValueError(f"{name}: new width {new_width} is not a multiple of {per} channels per {what}")
    return new_width // per


def _sync_module(module: nn.Module, old_shapes: Mapping[str, torch.Size], name: str) -> None:
    """Update ``module``'s shape attributes after some of its tensors changed shape."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, _ConvNd):
        _sync_conv(module, name)
    elif isinstance(module, (_BatchNorm, _InstanceNorm)):
        reference = weight if weight is not None else module.running_mean
        module.num_features = int(reference.shape[0])
    elif isinstance(module, nn.GroupNorm):
        width = int(weight.shape[0])
        module.num_groups = _scaled_count(module.num_groups, module.num_channels, width, "group", name)
        module.num_channels = width
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(weight.shape)
        if isinstance(module, BlockLayerNorm):
            module.num_blocks = int(weight.shape[-1]) // module.block_size
    elif isinstance(module, nn.MultiheadAttention):
        _sync_attention(module)
    elif isinstance(module, nn.PReLU):
        module.num_parameters = int(weight.numel())
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = weight.shape
    else:
        _sync_width_attributes(module, old_shapes, name)


def _sync_conv(conv: _ConvNd, name: str) -> None:
    weight = conv.weight
    if conv.transposed:  # weight: (in, out / groups, *kernel)
        new_in = int(weight.shape[0])
        if conv.groups > 1:
            conv.groups = _scaled_count(conv.groups, conv.in_channels, new_in, "group", name)
        conv.in_channels, conv.out_channels = new_in, int(weight.shape[1]) * conv.groups
    else:  # weight: (out, in / groups, *kernel)
        new_out = int(weight.shape[0])
        if conv.groups > 1:
            conv.groups = _scaled_count(conv.groups, conv.out_channels, new_out, "group", name)
        conv.out_channels, conv.in_channels = new_out, int(weight.shape[1]) * conv.groups


def _sync_attention(mha: nn.MultiheadAttention) -> None:
    if mha.in_proj_weight is None:
        raise ValueError("attention with separate query/key/value projections cannot be resized")
    embed_dim = int(mha.in_proj_weight.shape[1])
    mha.num_heads = int(mha.in_proj_weight.shape[0]) // 3 // mha.head_dim
    mha.embed_dim = mha.kdim = mha.vdim = embed_dim


def _sync_width_attributes(module: nn.Module, old_shapes: Mapping[str, torch.Size], name: str) -> None:
    """Custom modules (e.g. ones holding a class token): update integer width attributes by name."""
    changes = {}
    for local, old in old_shapes.items():
        new = getattr(module, local).shape
        changes.update({int(o): int(n) for o, n in zip(old, new) if o != n})
    for attr in WIDTH_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value in changes:
            log.debug("%s.%s: %d -> %d", name or type(module).__name__, attr, value, changes[value])
            setattr(module, attr, changes[value])
