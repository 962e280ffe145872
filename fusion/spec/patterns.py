"""Permutation groups from the channel flow: splits, concatenations, shuffles, windows, patch merging.

torch-pruning's index mappings refuse or mis-map several common CNN and hybrid patterns (mixed-kernel
splits, ghost modules, split attention, Res2Net's hierarchical splits, channel shuffle, cross-stage
partial blocks, Swin/MaxViT window partitions and patch merging). :func:`flow_groups` derives the
groups from the tracer of :mod:`fusion.spec.patterns_flow` instead:

* every class of joined slots is one *unit* (a hidden channel), with its positions on each
  parameter axis (several when a flatten, a lock-step grouped convolution or a patch merge repeats
  it);
* units that touch exactly the same tensor axes the same number of times, and carry the same tags
  (heads, conv groups, normalisation sets), are interchangeable: they form one group; a split into
  k parts therefore gives k groups, one per part, because each part is read by other weights;
* units joined with the pinned slot (the model's inputs and outputs, or an operation without a
  channel rule) are refused, with the reason recorded where they were pinned.

:func:`second_opinion` is how :func:`~fusion.spec.permutation_spec` uses it: when torch-pruning's
groups leave hidden units refused (or cannot be built at all), the flow's groups are verified the
same way and whichever verified spec moves more parameter elements is kept.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ExampleInputError, TraceError
from ..guard import memory_guard
from .draft import _first_in_module_order
from .graph import _canonical_names, _resolve_ignored
from .indices import check_indices
from .patterns_flow import FIXED, OUTPUT_REASON, Flow, trace_flow
from .records import AxisMember, PermutationGroup, PermutationSpec, SkippedGroup
from .verify import verify_groups

log = logging.getLogger(__name__)

IGNORED_REASON = "ignored by the caller (ignored_layers)"

__all__ = ["flow_groups", "second_opinion"]


def _module(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


def flow_groups(
    model: nn.Module,
    example_inputs: Any,
    canonical: dict[str, str],
    order: dict[str, int],
    unwrapped: dict[str, int] | None = None,
    ignored: set[str] = frozenset(),
) -> tuple[list[PermutationGroup], list[SkippedGroup]]:
    """Permutation groups and refused units of ``model`` from its channel flow (see the module docstring).

    The output units of the modules named in ``ignored`` stay in place.
    """
    flow = trace_flow(model, example_inputs, unwrapped)
    for slots in flow.slots:
        if slots.role == "out" and _module(slots.name) in ignored:
            flow.pin(torch.arange(slots.start, slots.start + slots.size), IGNORED_REASON)
    return _groups(flow, canonical, order)


def _groups(flow: Flow, canonical: dict[str, str], order: dict[str, int]) -> tuple[list[PermutationGroup], list[SkippedGroup]]:
    positions: dict[int, dict[tuple[str, int], list[int]]] = defaultdict(lambda: defaultdict(list))
    roles: dict[int, set[tuple[str, str]]] = defaultdict(set)
    tags: dict[int, set] = defaultdict(set)
    pinned_by: dict[str, tuple[int, str]] = {}
    for slots in flow.slots:
        key = canonical.get(slots.name, slots.name)
        for p in range(slots.size):
            s = slots.start + p
            root = flow.find(s)
            if root == FIXED:
                if slots.role == "out":
                    reason = flow.pin_reason.get(s)
                    size, first = pinned_by.get(slots.name, (0, None))
                    pinned_by[slots.name] = (size + 1, first or reason)
                continue
            positions[root][(key, slots.axis)].append(p)
            roles[root].add((slots.role, _module(key)))
            tags[root] |= flow.tags.get(s, set())
    cells: dict[tuple, list[int]] = defaultdict(list)
    for root, members in positions.items():
        shape = tuple(sorted((k, a, len(ps)) for (k, a), ps in members.items()))
        cells[(shape, frozenset(tags[root]))].append(root)
    groups = []
    for (shape, _), roots in cells.items():
        if len(roots) < 2:
            continue
        roots.sort(key=lambda r: min(min(ps) for ps in positions[r].values()))
        members = tuple(
            AxisMember(k, a, torch.tensor([sorted(positions[r][(k, a)]) for r in roots], dtype=torch.long))
            for k, a, _ in shape
        )
        producers = sorted({m for role, m in set().union(*(roles[r] for r in roots)) if role == "out"})
        consumers = sorted({m for role, m in set().union(*(roles[r] for r in roots)) if role == "in"})
        if not producers:
            continue
        base = _first_in_module_order(producers, order)
        groups.append(PermutationGroup(base, len(roots), members, tuple(producers), tuple(consumers)))
    groups = _distinct_names(groups, order)
    skipped = [SkippedGroup(_module(name), size, reason or _PINNED, _KINDS.get(reason, "unsupported"))
               for name, (size, reason) in pinned_by.items()]
    return groups, skipped


_PINNED = ("coupled to units that must stay in place (the model's inputs or outputs, or an operation without a "
           "channel rule)")
_KINDS = {OUTPUT_REASON: "output", IGNORED_REASON: "ignored"}


def _distinct_names(groups: list[PermutationGroup], order: dict[str, int]) -> list[PermutationGroup]:
    by_base: dict[str, list[PermutationGroup]] = defaultdict(list)
    for g in groups:
        by_base[g.name].append(g)
    out = []
    for base, same in by_base.items():
        if len(same) == 1:
            out.append(same[0])
            continue
        for g in same:
            lo = int(min(m.index.min() for m in g.members if _module(m.name) == base))
            hi = int(max(m.index.max() for m in g.members if _module(m.name) == base)) + 1
            out.append(PermutationGroup(f"{base}[{lo}:{hi}]", g.size, g.members, g.producers, g.consumers, g.kind))
    names = defaultdict(int)
    result = []
    for g in sorted(out, key=lambda g: (order.get(g.name.split("[")[0], len(order)), g.name)):
        names[g.name] += 1
        if names[g.name] > 1:
            g = PermutationGroup(f"{g.name}#{names[g.name]}", g.size, g.members, g.producers, g.consumers, g.kind)
        result.append(g)
    return result


def moved_elements(groups: list[PermutationGroup], shapes: dict[str, tuple[int, ...]]) -> int:
    """How many parameter elements a permutation of every group can move (tensors touched by some group)."""
    total = 0
    for key in {m.name for g in groups for m in g.members}:
        n = 1
        for s in shapes.get(key, ()):
            n *= s
        total += n
    return total


#: Skip kinds that a second opinion from the channel flow may recover.
_RECOVERABLE = {"unsupported", "unmapped", "unmoved tensor", "verification", "trace"}


def second_opinion(
    model: nn.Module,
    example_inputs: Any,
    spec: PermutationSpec | None,
    error: TraceError | None,
    verify: bool,
    seed: int,
    ignored_layers: Sequence[str | nn.Module] | None = None,
    unwrapped_parameters: dict[str, int] | None = None,
    deadline: float | None = None,
) -> PermutationSpec:
    """torch-pruning's spec, or the channel flow's where that moves at least as many parameter elements.

    ``spec`` is torch-pruning's (None when it raised ``error``). The flow is consulted only when
    torch-pruning refused hidden units for a reason the flow may not share; its groups are verified
    the same way (unless ``verify`` is False, when it only stands in for a graph that failed).
    """
    if spec is not None and not any(s.kind in _RECOVERABLE for s in spec.skipped):
        return spec
    if (spec is None and not verify) or (deadline is not None and time.monotonic() >= deadline):
        if spec is None:
            raise error
        return spec
    canonical = _canonical_names(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    order.update({name: len(order) + i for i, name in enumerate(canonical)})
    try:
        with memory_guard(f"tracing the channel flow of {type(model).__name__}", deadline=deadline):
            groups, skipped = flow_groups(model, example_inputs, canonical, order, unwrapped_parameters,
                                          _ignored_names(model, ignored_layers))
    except ExampleInputError:
        raise
    except Exception as exc:  # the flow is a second opinion: its failure leaves torch-pruning's answer
        log.info("channel flow failed on %s: %s: %s", type(model).__name__, type(exc).__name__, exc)
        if spec is None:
            raise error from exc
        return spec
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    groups, unmapped = check_indices(groups, shapes, source="the channel flow")
    skipped = skipped + unmapped
    if verify:
        # The flow's groups are checked on two independently re-drawn copies: on one copy a wrong
        # coupling of a few units can hide behind units that happen to be dead on the check's inputs.
        for copy_seed in (seed, seed + 1):
            groups, refused = verify_groups(model, example_inputs, groups, copy_seed)
            skipped = skipped + refused
    if spec is not None and any(g.kind != "channels" for g in spec.groups):
        groups, skipped = _with_heads(model, example_inputs, spec, groups, skipped, verify, seed)
    # torch-pruning refused part of this model, so it was confused somewhere: on a tie, trust the flow
    # (a wrong coupling next to the refused one can pass verification by chance, e.g. two swapped
    # split parts permuted by the same cycle); a tie with a head-aware spec keeps the heads
    tp_moved, flow_moved = moved_elements(list(spec.groups), shapes) if spec is not None else -1, moved_elements(groups, shapes)
    if spec is not None and (tp_moved > flow_moved or (tp_moved == flow_moved and
                                                       any(g.kind != "channels" for g in spec.groups))):
        return spec
    log.info("%s: the channel flow's %d groups replace torch-pruning's", type(model).__name__, len(groups))
    return PermutationSpec(tuple(groups), tuple(skipped), shapes, type(model).__name__)


def _with_heads(model: nn.Module, example_inputs: Any, spec: PermutationSpec, groups: list[PermutationGroup],
                skipped: list[SkippedGroup], verify: bool, seed: int) -> tuple[list[PermutationGroup], list[SkippedGroup]]:
    """torch-pruning's head-aware groups plus the flow's groups on tensor axes none of them moves
    (e.g. a residual stream torch-pruning refused), verified together: the flow has no head groups."""
    taken = {(m.name, m.axis) for g in spec.groups for m in g.members}
    names = {g.name for g in spec.groups}
    extra = [g for g in groups if g.name not in names and not any((m.name, m.axis) in taken for m in g.members)]
    if not extra:
        return groups, skipped
    combined = list(spec.groups) + extra
    refused: list[SkippedGroup] = []
    if verify:
        combined, refused = verify_groups(model, example_inputs, combined, seed)
    covered = {g.name for g in combined}
    kept = [s for s in spec.skipped if s.name not in covered]
    return combined, kept + refused


def _ignored_names(model: nn.Module, ignored_layers: Sequence[str | nn.Module] | None) -> set[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return {names.get(id(m), "") for m in _resolve_ignored(model, ignored_layers)}
