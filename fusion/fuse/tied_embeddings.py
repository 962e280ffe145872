"""Tied input/output embeddings (GPT-2's ``wte``/``lm_head``) through a concatenation and back.

In a concatenated model one tensor cannot hold the members' blocks (as the input embedding) and a
weighted read-out of them (as the output layer) at once. :func:`_tied_output_aliases` finds such an
output layer, :func:`untied` gives it its own parameter (and sets a Hugging Face config's
``tie_word_embeddings=False``); once Neuron Transplantation has pruned the wide model back to the
members' architecture, :func:`_retie` ties it again, the output layer reading the transplanted input
embedding.
"""

from __future__ import annotations

import copy

from torch import nn

from .concat_fill import _canonical, _output_axis
from .layers import owner_of

__all__ = ["untied"]


def _tied_output_aliases(model: nn.Module, widened: dict[str, set[int]]) -> set[str]:
    """Keys of an output layer's weight that is tied to a layer writing widened units (a tied input
    embedding): one tensor cannot be both a member block and a weighted read-out."""
    aliases = set()
    for key, canonical in _canonical(model).items():
        _, module, local = owner_of(model, key)
        out = _output_axis(module, local)
        axes = widened.get(canonical, set())
        if key != canonical and axes and out is not None and out not in axes:
            aliases.add(key)
    return aliases


def untied(model: nn.Module, keys: set[str]) -> nn.Module:
    """A copy of ``model`` in which the parameters ``keys`` are no longer shared with another name
    (and a Hugging Face config says ``tie_word_embeddings=False``, so that nothing re-ties them)."""
    model = copy.deepcopy(model)
    for key in keys:
        _, module, local = owner_of(model, key)
        old = module._parameters[local]
        module._parameters[local] = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
    config = getattr(model, "config", None)
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    return model


def _retie(fused: nn.Module, member: nn.Module) -> nn.Module:
    """Tie again what the members tie (the concatenation unties a tied output embedding): the fused model
    has the members' architecture, its output layer reading the transplanted input embedding."""
    first: dict[int, str] = {}
    tied = {key: first.setdefault(id(t), key) for key, t in member.state_dict(keep_vars=True).items()}
    params = dict(fused.named_parameters(remove_duplicate=False))
    for key in tied:
        if tied[key] != key and key in params and tied[key] in params and params[key] is not params[tied[key]]:
            _, module, local = owner_of(fused, key)
            module._parameters[local] = params[tied[key]]
    member_config, config = getattr(member, "config", None), getattr(fused, "config", None)
    if hasattr(member_config, "tie_word_embeddings") and config is not None:
        config.tie_word_embeddings = member_config.tie_word_embeddings
    return fused
