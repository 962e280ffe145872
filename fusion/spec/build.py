"""permutation_spec(): from a model and example inputs to its :class:`PermutationSpec`."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..checks import caches_restored, eval_mode, move_inputs
from ..errors import FusionError, PermutationError, TraceError
from ..guard import memory_guard
from .attention_probe import AttentionSearch, find_attention
from .draft import _draft_group, _first_in_module_order, _groups_from_draft, _Unsupported
from .graph import _all_groups, _build_graph, _canonical_names, _resolve_ignored
from .heads import head_groups, head_refusal, merge_sharing
from .indices import check_indices
from .patterns import second_opinion
from .records import PermutationGroup, PermutationSpec, SkippedGroup
from .verify import verify_groups

log = logging.getLogger(__name__)

#: Default time budget (seconds) of torch-pruning's tracing and grouping in :func:`permutation_spec`.
DEFAULT_TIMEOUT = 300.0
#: Seconds torch-pruning may take when the channel flow can stand in for it (see ``channel_flow``).
FLOW_TP_BUDGET = 45.0


def permutation_spec(
    model: nn.Module,
    example_inputs: Any,
    ignored_layers: Sequence[str | nn.Module] | None = None,
    unwrapped_parameters: dict[str, int] | None = None,
    attention_heads: bool = True,
    verify: bool = True,
    seed: int = 0,
    timeout: float | None = DEFAULT_TIMEOUT,
    channel_flow: bool = True,
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
        timeout: seconds allowed for torch-pruning's tracing and grouping together (None: no limit);
            past it a :class:`TraceError` names the stage that ran out of time.
        channel_flow: where torch-pruning refuses hidden units or cannot trace the model, also derive
            the groups from the channel flow (:mod:`fusion.spec.patterns`: splits, ghost modules,
            shuffles, window partitions, patch merging...) and keep whichever verified spec moves
            more parameter elements. torch-pruning then gets at most ``FLOW_TP_BUDGET`` seconds of
            the timeout, as the flow can answer when it runs away.

    Returns:
        The :class:`PermutationSpec`, reusable for every model of this architecture.

    Raises:
        ExampleInputError: the model rejects ``example_inputs``.
        TraceError: torch-pruning cannot trace or group the model, runs out of memory or time, or
            third-party code fails outside any one group. Failures inside one group refuse that
            group instead (see :attr:`SkippedGroup.kind`); no other exception escapes.

    Example:
        >>> spec = permutation_spec(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        >>> perms = random_permutation(spec, seed=0)
        >>> same_function = permute(model, perms, spec)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # torch-pruning only reads the model (it traces with temporary hooks, in eval mode; hooks left by an
    # interrupted trace are removed) and the verification works on a deep copy, so the model's tensors
    # never change: the train/eval mode of every submodule is restored on exit.
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise PermutationError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    deadline = None if timeout is None else time.monotonic() + timeout
    ignored = _resolve_ignored(model, ignored_layers)
    params = dict(model.named_parameters())
    missing = [n for n in unwrapped_parameters or () if n not in params]
    if missing:
        raise PermutationError(f"unwrapped_parameters names {missing[0]!r}, which is not a parameter of the model")
    unwrapped = [(params[n], axis) for n, axis in unwrapped_parameters.items()] if unwrapped_parameters else None
    tp_deadline = deadline
    if channel_flow:
        tp_deadline = min(deadline or float("inf"), time.monotonic() + FLOW_TP_BUDGET)
    with eval_mode(model), caches_restored(model):
        try:
            spec, error = _build_spec(model, example_inputs, ignored, unwrapped, attention_heads, verify, seed,
                                      tp_deadline), None
        except TraceError as exc:
            spec, error = None, exc
        except FusionError:
            raise
        except Exception as exc:  # third-party code outside any one group: never a raw exception
            spec, error = None, TraceError(f"building the permutation spec of {type(model).__name__} failed: "
                                           f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
        if not channel_flow:
            if error is not None:
                raise error
            return spec
        # where torch-pruning refuses units (or cannot trace), the channel flow may cover them (fusion.spec.patterns)
        return second_opinion(model, example_inputs, spec, error, verify, seed, ignored_layers, unwrapped_parameters,
                              deadline)


def _build_spec(
    work: nn.Module,
    example_inputs: Any,
    ignored: list[nn.Module],
    unwrapped: list[tuple[nn.Parameter, int]] | None,
    attention_heads: bool,
    verify: bool,
    seed: int,
    deadline: float | None,
) -> PermutationSpec:
    from ..checks import model_device

    model = work
    example_inputs = move_inputs(example_inputs, model_device(work))
    canonical = _canonical_names(work)
    # attention layers first: their head layouts are read off a float64 probe, and the graph is cut
    # at their projections (fusion.spec.heads)
    search = AttentionSearch((), ())
    if attention_heads:
        with memory_guard(f"reading the attention layouts of {type(work).__name__}", deadline=deadline):
            search = find_attention(work, example_inputs, canonical, seed)
    graph = _build_graph(work, example_inputs, unwrapped, deadline, search.cut_outputs, search.cut_inputs)
    internal = search.internal_axes

    order = {name: i for i, (name, _) in enumerate(work.named_modules())}
    order.update({name: len(order) + i for i, name in enumerate(canonical)})
    groups: list[PermutationGroup] = []
    skipped: list[SkippedGroup] = []
    ignored_names = {graph._module2name.get(m, "") for m in ignored}
    for tp_group in _all_groups(graph, model, deadline):
        try:
            draft = _draft_group(graph, tp_group, canonical)
        except Exception as exc:  # _Unsupported, or torch-pruning's indices not readable
            root = tp_group[0].dep.target
            name = graph._module2name.get(root.module, graph._param_to_name.get(root.module, str(root)))
            skipped.append(_refusal(name, len(tp_group[0].idxs), exc))
            continue
        if not draft.entries:
            continue
        axes = {(e.key, e.axis) for e in draft.entries}
        if axes <= internal:
            continue  # attention head dimensions: the head groups below move them
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
            except Exception as exc:
                skipped.append(_refusal(name, draft.size, exc))

    groups, refused = merge_sharing(groups)  # tied weights read by several layers (T5's shared embedding)
    skipped.extend(refused)
    if attention_heads:
        untraced = {n for n, m in work.named_modules() if isinstance(m, nn.MultiheadAttention) and m not in graph.module2node}
        skipped.extend(SkippedGroup(n, work.get_submodule(n).num_heads, "attention layer was not traced", "unsupported")
                       for n in sorted(untraced))
        heads, refused = head_groups(search, exclude=untraced)
        groups.extend(heads)
        skipped.extend(refused)

    names = defaultdict(int)
    for g in groups:
        names[g.name] += 1
    groups = _unique_names(groups, names)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    groups, unmapped = check_indices(groups, shapes)
    skipped.extend(unmapped)
    # Module order; an attention layer's whole-head group comes before its within-head groups,
    # which act on the head positions after heads are reordered (the groups overlap).
    rank = {"channels": 0, "heads": 1, "head_qk": 2, "head_v": 2}
    groups.sort(key=lambda g: (order.get(g.name.split("[")[0] if g.kind == "channels" else g.producers[0], len(order)),
                               rank.get(g.kind, 2), not g.name.endswith(".heads"), g.name))

    if verify:
        kinds = {g.name: g.kind for g in groups}
        groups, refused = verify_groups(work, example_inputs, groups, seed)
        skipped.extend(head_refusal(s, kinds[s.name]) if s.kind == "verification" else s for s in refused)

    return PermutationSpec(tuple(groups), tuple(skipped), shapes, type(model).__name__)


def _refusal(name: str, size: int, exc: Exception) -> SkippedGroup:
    """The refused group for an exception raised while translating one torch-pruning group."""
    if isinstance(exc, _Unsupported):
        return SkippedGroup(name, size, str(exc), "unsupported")
    log.debug("group %s refused: %s: %s", name, type(exc).__name__, exc)
    return SkippedGroup(name, size, f"the units' index mapping could not be built ({type(exc).__name__}: {exc})",
                        "unmapped")


def _unique_names(groups: list[PermutationGroup], counts: dict[str, int]) -> list[PermutationGroup]:
    seen: dict[str, int] = defaultdict(int)
    out = []
    for g in groups:
        if counts[g.name] > 1:
            seen[g.name] += 1
            g = PermutationGroup(f"{g.name}#{seen[g.name]}", g.size, g.members, g.producers, g.consumers, g.kind)
        out.append(g)
    return out
