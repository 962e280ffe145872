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
from .draft import _draft_group, _first_in_module_order, _groups_from_draft, _Unsupported
from .graph import _build_graph, _canonical_names, _resolve_ignored
from .heads import AttentionSearch, find_attention, head_groups, merge_sharing, structural_copy
from .records import PermutationGroup, PermutationSpec, SkippedGroup
from .verify import _Verifier

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
        model: any module torch-pruning can trace. It is not modified (the graph is built on a
            deep copy, so not even its train/eval mode changes).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs that
            the model accepts, e.g. ``torch.randn(1, 3, 64, 64)``.
        ignored_layers: module names (or modules) whose output units must stay in place.
        unwrapped_parameters: ``{parameter name: axis}`` for parameters outside standard modules
            (class tokens, positional embeddings) whose channel axis is not their last
            non-singleton axis (torch-pruning's guess).
        attention_heads: also add per-head groups for ``nn.MultiheadAttention`` (q/k dims, v dims,
            whole heads).
        verify: check every group on the model itself: a random permutation must leave the
            output on ``example_inputs`` unchanged (relative difference <= 1e-4 in float32);
            failing groups are found by bisection and moved to :attr:`PermutationSpec.skipped`.
        seed: seed of the verification permutations.

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
    probe = structural_copy(work, seed) if attention_heads else None
    search = find_attention(work, example_inputs, canonical, probe) if attention_heads else AttentionSearch((), ())
    graph = _build_graph(work, example_inputs, unwrapped, search.cut_outputs, search.cut_inputs)
    internal = search.internal_axes

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
            skipped.append(SkippedGroup(name, len(tp_group[0].idxs), str(exc)))
            continue
        if not draft.entries:
            continue
        touched = {(e.key, e.axis) for e in draft.entries} & internal
        if touched and len(touched) == len({(e.key, e.axis) for e in draft.entries}):
            continue  # attention head dimensions: the head groups below move them
        name = _first_in_module_order([n for n, _ in draft.producers] or [e.key for e in draft.entries], order)
        if draft.out_modules & ignored_names:
            skipped.append(SkippedGroup(name, draft.size, "ignored by the caller (ignored_layers)"))
        elif draft.reaches_output:
            skipped.append(SkippedGroup(name, draft.size, "its units are the model's output"))
        elif not draft.consumers:
            skipped.append(SkippedGroup(name, draft.size, "no layer reads these units"))
        else:
            try:
                groups.extend(_groups_from_draft(draft, order))
            except _Unsupported as exc:
                skipped.append(SkippedGroup(name, draft.size, str(exc)))

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    outside = {g.name: m for g in groups for m in g.members if int(m.index.max()) >= shapes[m.name][m.axis]}
    skipped.extend(SkippedGroup(g.name, g.size, f"the dependency graph maps units outside {outside[g.name].name} "
                                f"(axis {outside[g.name].axis} of size {shapes[outside[g.name].name][outside[g.name].axis]})")
                   for g in groups if g.name in outside)
    groups = [g for g in groups if g.name not in outside]
    groups, refused = merge_sharing(groups)  # tied weights read by several layers (T5's shared embedding)
    skipped.extend(refused)
    if attention_heads:
        untraced = {n for n, m in work.named_modules() if isinstance(m, nn.MultiheadAttention) and m not in graph.module2node}
        skipped.extend(SkippedGroup(n, work.get_submodule(n).num_heads, "attention layer was not traced") for n in untraced)
        heads, refused = head_groups(search, probe, example_inputs, seed, exclude=untraced)
        groups.extend(heads)
        skipped.extend(refused)

    names = defaultdict(int)
    for g in groups:
        names[g.name] += 1
    groups = _unique_names(groups, names)
    # Module order; an attention layer's whole-head group comes before its within-head groups,
    # which act on the head positions after heads are reordered (the groups overlap).
    rank = {"channels": 0, "heads": 1, "head_qk": 2, "head_v": 2}
    groups.sort(key=lambda g: (order.get(g.name.split("[")[0] if g.kind == "channels" else g.producers[0], len(order)),
                               rank[g.kind], not g.name.endswith(".heads"), g.name))

    if verify and groups:
        failing = _Verifier(work, example_inputs, seed).failing(groups)
        if failing:
            log.warning("refusing %d permutation group(s) that change the output: %s", len(failing), sorted(failing))
        skipped.extend(
            SkippedGroup(g.name, g.size, f"a random permutation changed the output (relative difference "
                         f"{failing[g.name]:.2e}); the dependency graph is unsure here")
            for g in groups if g.name in failing
        )
        groups = [g for g in groups if g.name not in failing]

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
