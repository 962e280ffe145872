"""permutation_spec(): from a model and example inputs to its :class:`PermutationSpec`."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..checks import eval_mode, move_inputs
from ..errors import PermutationError
from ..guard import memory_guard
from .attention import _attention_groups
from .draft import _draft_group, _first_in_module_order, _groups_from_draft, _Unsupported
from .graph import _build_graph, _canonical_names, _resolve_ignored
from .records import PermutationGroup, PermutationSpec, SkippedGroup
from .verify import verify_groups

log = logging.getLogger(__name__)


def permutation_spec(
    model: nn.Module,
    example_inputs: Any,
    ignored_layers: Sequence[str | nn.Module] | None = None,
    unwrapped_parameters: dict[str, int] | None = None,
    attention_heads: bool = True,
    verify: bool = True,
    seed: int = 0,
) -> PermutationSpec:
    """Derive the permutation symmetries of ``model`` from torch-pruning's dependency graph.

    Args:
        model: any module torch-pruning can trace. Its weights and buffers are not modified; it is
            traced in eval mode (each submodule's mode is restored) and verified on a deep copy.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs that
            the model accepts, e.g. ``torch.randn(1, 3, 64, 64)``.
        ignored_layers: module names (or modules) whose output units must stay in place.
        unwrapped_parameters: ``{parameter name: axis}`` for parameters outside standard modules
            (class tokens, positional embeddings) whose channel axis is not their last
            non-singleton axis (torch-pruning's guess).
        attention_heads: also add per-head groups for ``nn.MultiheadAttention`` (q/k dims, v dims,
            whole heads).
        verify: check every group structurally (:mod:`fusion.spec.verify`): on a float64 deep copy
            of the model with every parameter and normalisation statistic re-drawn at O(1) scale, a
            random permutation must leave the output on ``example_inputs`` and on a fresh random
            input of the same structure unchanged (relative difference <= 1e-9). Failing groups are
            found by bisection and moved to :attr:`PermutationSpec.skipped` (kind ``"verification"``,
            or ``"unmoved tensor"`` naming a tensor the forward reads along the units that no rule
            moves). ``verify=False`` returns the graph's groups unchecked.
        seed: seed of the re-drawn weights, the fresh input and the verification permutations.

    Returns:
        The :class:`PermutationSpec`, reusable for every model of this architecture.

    Raises:
        ExampleInputError: the model rejects ``example_inputs``.
        TraceError: torch-pruning cannot trace the model.

    Example:
        >>> spec = permutation_spec(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        >>> perms = random_permutation(spec, seed=0)
        >>> same_function = permute(model, perms, spec)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # torch-pruning only reads the model (it traces with temporary hooks, in eval mode) and the
    # verification passes permuted tensors functionally, so no copy is needed: the train/eval
    # mode of every submodule is restored on exit.
    with eval_mode(model):
        return _build_spec(model, example_inputs, ignored_layers, unwrapped_parameters, attention_heads, verify, seed)


def _build_spec(
    work: nn.Module,
    example_inputs: Any,
    ignored_layers: Sequence[str | nn.Module] | None,
    unwrapped_parameters: dict[str, int] | None,
    attention_heads: bool,
    verify: bool,
    seed: int,
) -> PermutationSpec:
    from ..checks import model_device

    model = work
    example_inputs = move_inputs(example_inputs, model_device(work))
    canonical = _canonical_names(work)
    ignored = _resolve_ignored(work, ignored_layers)
    params = dict(work.named_parameters())
    unwrapped = None
    if unwrapped_parameters:
        missing = [n for n in unwrapped_parameters if n not in params]
        if missing:
            raise PermutationError(f"unwrapped_parameters names {missing[0]!r}, which is not a parameter of the model")
        unwrapped = [(params[n], axis) for n, axis in unwrapped_parameters.items()]
    graph = _build_graph(work, example_inputs, unwrapped)

    order = {name: i for i, (name, _) in enumerate(work.named_modules())}
    order.update({name: len(order) + i for i, name in enumerate(canonical)})
    groups: list[PermutationGroup] = []
    skipped: list[SkippedGroup] = []
    ignored_names = {graph._module2name.get(m, "") for m in ignored}
    with memory_guard(f"building the dependency groups of {type(model).__name__}"):
        tp_groups = list(graph.get_all_groups(root_module_types=(nn.Module,)))
    for tp_group in tp_groups:
        try:
            draft = _draft_group(graph, tp_group, canonical)
        except _Unsupported as exc:
            root = tp_group[0].dep.target
            name = graph._module2name.get(root.module, graph._param_to_name.get(root.module, str(root)))
            skipped.append(SkippedGroup(name, len(tp_group[0].idxs), str(exc), "unsupported"))
            continue
        if not draft.entries:
            continue
        name = _first_in_module_order([n for n, _ in draft.producers] or [e.key for e in draft.entries], order)
        if draft.out_modules & ignored_names:
            skipped.append(SkippedGroup(name, draft.size, "ignored by the caller (ignored_layers)", "ignored"))
        elif draft.reaches_output:
            skipped.append(SkippedGroup(name, draft.size, "its units are the model's output", "output"))
        elif not draft.consumers:
            skipped.append(SkippedGroup(name, draft.size, "no layer reads these units", "unread"))
        else:
            try:
                groups.extend(_groups_from_draft(draft, order))
            except _Unsupported as exc:
                skipped.append(SkippedGroup(name, draft.size, str(exc), "unsupported"))

    if attention_heads:
        for name, module in work.named_modules():
            if isinstance(module, nn.MultiheadAttention) and module in graph.module2node:
                groups.extend(_attention_groups(name, module, canonical))
            elif isinstance(module, nn.MultiheadAttention):
                skipped.append(SkippedGroup(name, module.num_heads, "attention layer was not traced", "unsupported"))

    names = defaultdict(int)
    for g in groups:
        names[g.name] += 1
    groups = _unique_names(groups, names)
    # Module order; an attention layer's whole-head group comes before its within-head groups,
    # which act on the head positions after heads are reordered (the groups overlap).
    rank = {"channels": 0, "heads": 1, "head_qk": 2, "head_v": 2}
    groups.sort(key=lambda g: (order.get(g.name.split("[")[0] if g.kind == "channels" else g.producers[0], len(order)),
                               rank[g.kind], g.name))

    if verify:
        groups, refused = verify_groups(work, example_inputs, groups, seed)
        skipped.extend(refused)

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return PermutationSpec(tuple(groups), tuple(skipped), shapes, type(model).__name__)


def _unique_names(groups: list[PermutationGroup], counts: dict[str, int]) -> list[PermutationGroup]:
    seen: dict[str, int] = defaultdict(int)
    out = []
    for g in groups:
        if counts[g.name] > 1:
            seen[g.name] += 1
            g = PermutationGroup(f"{g.name}#{seen[g.name]}", g.size, g.members, g.producers, g.consumers, g.kind)
        out.append(g)
    return out
