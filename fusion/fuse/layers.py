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

import copy
import logging
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["BlockLayerNorm", "BlockNorm", "CONFIG_FIELDS", "HEAD_ATTRIBUTES", "WIDTH_ATTRIBUTES", "is_channel_norm",
           "owner_of", "resize_tensors", "restore_norm", "set_submodule"]

log = logging.getLogger(__name__)

#: Integer attributes of custom modules that hold a width (updated by :func:`resize_tensors` when a
#: tensor owned by such a module changes length from the attribute's value; e.g. torchvision's
#: ``VisionTransformer.hidden_dim``, which its forward uses to reshape the patch embedding).
WIDTH_ATTRIBUTES = ("hidden_dim", "embed_dim", "d_model", "hidden_size", "width", "dim", "nf", "nx")

#: Head counts and attention/MLP widths that attention modules and their parents keep without owning a
#: tensor of that length (Hugging Face ``GPT2Attention.split_size``, ``BertSelfAttention.all_head_size``,
#: timm ``Attention.num_heads``/``attn_dim``, ...). When every tensor below such a module changes
#: length by one factor (a concatenation of ``N`` members: ``N``; pruning it back: ``1 / N``), these
#: attributes are scaled by it. ``head_dim`` and ratios such as ``num_key_value_groups`` are not
#: widths and stay as they are.
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "num_kv_heads",
                   "n_kv_heads", "split_size", "all_head_size", "attn_dim", "embed_dim", "hidden_size", "inner_dim",
                   "intermediate_size", "num_features", "head_hidden_size")

#: Fields of a Hugging Face config (``model.config``) scaled the same way at the model's root.
CONFIG_FIELDS = ("hidden_size", "n_embd", "d_model", "embed_dim", "intermediate_size", "n_inner", "num_attention_heads",
                 "n_head", "num_key_value_heads", "encoder_attention_heads", "decoder_attention_heads", "ffn_dim",
                 "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "mlp_dim", "dim", "n_heads", "hidden_dim")


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


def is_channel_norm(module: nn.Module) -> bool:
    """A normalisation over the last axis with one scale per channel: ``nn.LayerNorm``, ``nn.RMSNorm``, or a
    library's ``*LayerNorm``/``*RMSNorm`` class (Hugging Face ``LlamaRMSNorm``, ...)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


class BlockNorm(nn.Module):
    """Any channel norm (see :func:`is_channel_norm`) applied separately to ``num_blocks`` slices of the last axis.

    The general form of :class:`BlockLayerNorm`, for norms whose formula lives in another class (RMSNorm
    variants, ``(1 + weight)`` scales, ...): each slice goes through ``template`` (a copy of the members'
    norm) with its slice of this module's ``weight`` (and ``bias``), so the wide model of a concatenation
    normalises every member's features on their own. The parameters keep the template's names.

    Args:
        template: the members' norm (copied; its own parameters are not used).
        weight, bias: the wide parameters (length ``num_blocks * block``); ``bias`` may be None.
        num_blocks: number of slices.
    """

    def __init__(self, template: nn.Module, weight: nn.Parameter, bias: nn.Parameter | None, num_blocks: int) -> None:
        super().__init__()
        if weight.shape[-1] % num_blocks:
            raise ValueError(f"width {weight.shape[-1]} is not a multiple of {num_blocks} blocks")
        object.__setattr__(self, "template", copy.deepcopy(template))  # not a submodule: no state-dict entries
        self.num_blocks = num_blocks
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.weight.shape[-1] // self.num_blocks
        parts = []
        for k, chunk in enumerate(x.unflatten(-1, (self.num_blocks, block)).unbind(-2)):
            tensors = {"weight": self.weight[k * block:(k + 1) * block]}
            if self.bias is not None:
                tensors["bias"] = self.bias[k * block:(k + 1) * block]
            parts.append(torch.func.functional_call(self.template, tensors, (chunk,)))
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"{type(self.template).__name__}, num_blocks={self.num_blocks}"


def restore_norm(original: nn.Module, block: nn.Module) -> nn.Module:
    """A copy of the members' norm ``original`` holding ``block``'s (wide) parameters: the plain norm over
    the whole axis, which has the same parameters and coupling as a block norm (for tracing and pruning)."""
    norm = copy.deepcopy(original)
    for name in ("weight", "bias"):
        if getattr(original, name, None) is not None:
            setattr(norm, name, getattr(block, name))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = tuple(block.weight.shape)
    norm.train(block.training)
    return norm


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
    before = {name: _attributes(model.get_submodule(name)) for name in old_shapes}
    for module_name, shapes in old_shapes.items():
        _sync_module(model.get_submodule(module_name), shapes, module_name)
    synced = {name: {a for a, v in values.items() if getattr(model.get_submodule(name), a) != v}
              for name, values in before.items()}
    _sync_ancestors(model, old_shapes, synced)


def _attributes(module: nn.Module) -> dict[str, Any]:
    return {attr: getattr(module, attr) for attr in HEAD_ATTRIBUTES if hasattr(module, attr)}


def _sync_ancestors(model: nn.Module, old_shapes: Mapping[str, Mapping[str, torch.Size]],
                    synced: Mapping[str, set[str]]) -> None:
    """Scale :data:`HEAD_ATTRIBUTES` of every module at or above changed tensors by the factor all of
    them changed by (when there is one; attributes the tensor owners already updated are left), and the
    root's Hugging Face config fields likewise."""
    ratios: dict[str, set[Fraction]] = {}
    for module_name, shapes in old_shapes.items():
        module = model.get_submodule(module_name)
        changes = {Fraction(int(n), int(o)) for local, old in shapes.items()
                   for o, n in zip(old, getattr(module, local).shape) if o != n}
        parts = module_name.split(".") if module_name else []
        for depth in range(len(parts) + 1):
            ratios.setdefault(".".join(parts[:depth]), set()).update(changes)
    for name, found in ratios.items():
        if len(found) != 1:
            continue
        (ratio,) = found
        module = model.get_submodule(name)
        names = tuple(a for a in HEAD_ATTRIBUTES if a not in synced.get(name, ()))
        _scale_attributes(module, names, ratio, name or type(module).__name__)
        config = getattr(module, "config", None)
        if name == "" and config is not None and not isinstance(config, (dict, int, str)):
            aliases = getattr(config, "attribute_map", {})  # e.g. DistilBERT: num_attention_heads -> n_heads
            _scale_attributes(config, tuple(f for f in CONFIG_FIELDS if f not in aliases), ratio, "config")


def _scale_attributes(owner: object, names: tuple[str, ...], ratio: Fraction, label: str) -> None:
    for attr in names:
        value = getattr(owner, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and (value * ratio).denominator == 1:
            log.debug("%s.%s: %d -> %d", label, attr, value, int(value * ratio))
            setattr(owner, attr, int(value * ratio))


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
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
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
