"""Permutation alignment of model B to model A: weight matching, activation matching, optimal transport.

:func:`align` is the one entry point (``method=`` picks the algorithm, as in POT); the algorithms
live in :mod:`~fusion.align.weight`, :mod:`~fusion.align.activation` and :mod:`~fusion.align.ot`,
the streamed statistics in :mod:`~fusion.align.stats`. :func:`align_many` brings several models
into one basis (to the first model, or MergeMany-style to the evolving mean).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checks import check_finite, check_models, check_same_device, iter_batches
from ..errors import (
    AlignmentError,
    ArchitectureMismatchError,
    EnsembleError,
    WidthMismatchError,
)
from ..permute import permute, permute_state_dict
from ..progress import tqdm
from ..spec import PermutationSpec, permutation_spec
from .activation import activation_matching
from .ot import SOLVERS, ot_alignment, solve_transport, transport_state
from .result import Alignment
from .stats import PairStats, collect_pair_stats
from .weight import (
    group_similarity,
    matching_objective,
    solve_assignment,
    weight_matching,
)

__all__ = [
    "COSTS",
    "METHODS",
    "Alignment",
    "PairStats",
    "activation_matching",
    "align",
    "align_many",
    "collect_pair_stats",
    "group_similarity",
    "matching_objective",
    "ot_alignment",
    "solve_assignment",
    "solve_transport",
    "transport_state",
    "weight_matching",
]

METHODS = ("weight", "activation", "ot")
COSTS = ("weight", "activation")


def _check_choice(value: str, choices: Sequence[str], argument: str) -> None:
    if value not in choices:
        raise AlignmentError(f"Unknown {argument} {value!r}; choose one of {tuple(choices)}")


def _example_from(example_inputs: Any, data: Any) -> Any:
    if example_inputs is not None:
        return example_inputs
    if data is None:
        raise AlignmentError("pass example_inputs (to trace the model), data, or a precomputed spec")
    if isinstance(data, torch.Tensor):
        return data[:2]
    for batch in iter_batches(data):
        inputs, _ = batch
        return inputs[:2] if isinstance(inputs, torch.Tensor) else inputs
    raise AlignmentError("data is empty")  # pragma: no cover - iter_batches raises first


def _check_widths(model_a: nn.Module, model_b: nn.Module, method: str) -> bool:
    """True if the models share all shapes; raise if they cannot be aligned by ``method``."""
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if list(state_a) != list(state_b):
        check_models([model_a, model_b], ["model_a", "model_b"])  # names the first missing key
        raise ArchitectureMismatchError("model_a and model_b list their parameters in different orders")
    for key in state_a:
        shape_a, shape_b = tuple(state_a[key].shape), tuple(state_b[key].shape)
        if len(shape_a) != len(shape_b):
            raise ArchitectureMismatchError(f"{key!r} has shape {shape_a} in model_a but {shape_b} in model_b")
        if shape_a != shape_b and method != "ot":
            raise WidthMismatchError(
                f"{key!r} has shape {shape_a} in model_a but {shape_b} in model_b: method={method!r} needs "
                "equal widths; use method='ot' for models of different widths"
            )
    return all(state_a[k].shape == state_b[k].shape for k in state_a)


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    example_inputs: Any = None,
    method: str = "weight",
    data: Any = None,
    max_iter: int = 100,
    seed: int = 0,
    progress: bool = True,
    spec: PermutationSpec | None = None,
    cost: str = "weight",
    solver: str = "emd",
    reg: float = 0.01,
    tol: float = 1e-4,
) -> Alignment:
    """Align model B to model A by permuting (or transporting) B's hidden units.

    Args:
        model_a: the reference model (never modified).
        model_b: the model to align (never modified; the result holds an aligned copy).
        example_inputs: inputs for tracing the architecture (may be omitted when ``spec`` or
            ``data`` is given).
        method: ``"weight"`` (Git Re-Basin weight matching), ``"activation"`` (correlation of
            activations on ``data``) or ``"ot"`` (optimal transport; the only method for
            different widths).
        data: a DataLoader, an iterable of batches or a tensor; required for activation matching
            and for ``cost="activation"``.
        max_iter: the most sweeps of weight matching.
        seed: seed of the sweep order.
        progress: show tqdm progress bars.
        spec: a precomputed spec of model A's architecture.
        cost: ``"weight"`` or ``"activation"`` ground cost for ``method="ot"``.
        solver: ``"emd"`` (exact) or ``"sinkhorn"`` (entropic, with ``reg``) for ``method="ot"``.
        reg: entropic regularisation of the Sinkhorn solver.
        tol: weight matching stops when a sweep raises its objective by less than this fraction
            (0 runs until a sweep changes nothing).

    Returns:
        An :class:`Alignment` whose ``model`` is B in A's basis.

    Raises:
        AlignmentError: unknown ``method``/``cost``/``solver``, or no data where it is needed.
        ArchitectureMismatchError: the models differ in architecture (names the parameter).
        WidthMismatchError: the widths differ and ``method`` is not ``"ot"``.
        NonFiniteWeightsError, DeviceMismatchError: as named.
        DataError, ExampleInputError: empty data, or batches the models reject.

    Example:
        >>> result = align(model_a, model_b, torch.randn(1, 3, 32, 32), method="weight")
        >>> merged = interpolate(model_a, result.model, 0.5)
    """
    _check_choice(method, METHODS, "method")
    _check_choice(cost, COSTS, "cost")
    _check_choice(solver, SOLVERS, "solver")
    for name, model in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
        check_finite(model, name)
    check_same_device([model_a, model_b], ["model_a", "model_b"])
    equal = _check_widths(model_a, model_b, method)
    needs_data = method == "activation" or (method == "ot" and cost == "activation")
    if needs_data and data is None:
        raise AlignmentError(f"method={method!r} with cost={cost!r} needs data (a DataLoader, batches or a tensor)")
    example = _example_from(example_inputs, data) if spec is None else None
    spec_a = spec if spec is not None else permutation_spec(model_a, example)
    spec_a.check_model(model_a, "model_a")
    keys = {name for name, _ in model_a.named_parameters()}

    if method == "weight":
        perms, history = weight_matching(spec_a, model_a.state_dict(), model_b.state_dict(),
                                         max_iter=max_iter, seed=seed, progress=progress, keys=keys, tol=tol)
        return Alignment(permute(model_b, perms, spec_a), perms, history[-1] if history else 0.0,
                         history, method, spec_a)
    if method == "activation":
        perms, history, fallback = activation_matching(spec_a, model_a, model_b, data, progress, max_iter, seed)
        return Alignment(permute(model_b, perms, spec_a), perms, float(sum(history)), history, method, spec_a,
                         fallback=tuple(fallback))

    spec_b = spec_a if equal else permutation_spec(model_b, _example_from(example_inputs, data))
    plans, history = ot_alignment(spec_a, spec_b, model_a, model_b, cost, solver, reg, data, progress, keys)
    if equal:
        perms = {name: solve_assignment(plan) for name, plan in plans.items()}
        aligned = permute(model_b, perms, spec_a)
    else:
        perms = {}
        maps = {name: plan * plan.shape[0] for name, plan in plans.items()}
        aligned = copy.deepcopy(model_a)
        aligned.load_state_dict(transport_state(model_b.state_dict(), spec_a, spec_b, maps))
    return Alignment(aligned, perms, -float(sum(history)), history, method, spec_a, transport=plans)


def align_many(
    models: Sequence[nn.Module],
    example_inputs: Any = None,
    reference: str = "first",
    method: str = "weight",
    data: Any = None,
    spec: PermutationSpec | None = None,
    **kwargs: Any,
) -> list[Alignment]:
    """Bring several models of one architecture into one basis.

    Args:
        models: two or more models (never modified).
        example_inputs, method, data, spec: as for :func:`align`.
        reference: ``"first"`` aligns every model to ``models[0]`` with :func:`align`;
            ``"mean"`` is MergeMany (Ainsworth et al. 2023): repeatedly align each model, in a
            random order, to the mean of all the others by weight matching, until no
            permutation changes (at most ``max_iter`` rounds).
        **kwargs: further arguments of :func:`align` (``max_iter``, ``seed``, ``progress``, ...).

    Returns:
        One :class:`Alignment` per model (``models[0]`` included), each holding the aligned copy.
    """
    models = list(models)
    if len(models) < 2:
        raise EnsembleError(f"align_many needs at least two models, got {len(models)}")
    if reference not in ("first", "mean"):
        raise AlignmentError(f"Unknown reference {reference!r}; choose 'first' or 'mean'")
    check_models(models)
    spec = spec if spec is not None else permutation_spec(models[0], _example_from(example_inputs, data))
    if reference == "first":
        first = Alignment(copy.deepcopy(models[0]), {g.name: torch.arange(g.size) for g in spec.groups}, 0.0, [],
                          method, spec)
        return [first] + [align(models[0], m, spec=spec, method=method, data=data, **kwargs) for m in models[1:]]
    if method != "weight":
        raise AlignmentError("reference='mean' (MergeMany) is implemented with method='weight'")
    return _merge_many(models, spec, kwargs.get("max_iter", 100), kwargs.get("seed", 0), kwargs.get("progress", True))


def _merge_many(models: list[nn.Module], spec: PermutationSpec, max_iter: int, seed: int,
                progress: bool) -> list[Alignment]:
    states = [m.state_dict() for m in models]
    keys = {name for name, _ in models[0].named_parameters()}
    perms = [{g.name: torch.arange(g.size) for g in spec.groups} for _ in models]
    rng = np.random.default_rng(seed)
    history: list[float] = []
    for _ in tqdm(range(max_iter), desc="MergeMany", disable=not progress, leave=False):
        changed = False
        for i in rng.permutation(len(models)):
            others = [permute_state_dict(states[j], spec, perms[j]) for j in range(len(models)) if j != i]
            mean = {k: torch.stack([o[k].double() for o in others]).mean(0) if others[0][k].is_floating_point()
                    else others[0][k] for k in states[i]}
            new, _ = weight_matching(spec, mean, states[i], max_iter=max_iter, seed=seed, progress=False,
                                     keys=keys, init=perms[i])
            changed |= any(not torch.equal(new[g], perms[i][g]) for g in new)
            perms[i] = new
        history.append(sum(matching_objective(spec, states[0], states[i], perms[i], keys) for i in range(len(models))))
        if not changed:
            break
    return [Alignment(permute(m, p, spec), p, history[-1], list(history), "weight", spec)
            for m, p in zip(models, perms)]


