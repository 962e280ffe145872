"""``merge_task_vectors``: merge fine-tunes of one base held in memory as ``nn.Module``s."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ArchitectureMismatchError, MergeConfigError
from .config import MergeConfig, ModelInput, _check_contract
from .methods import get_method
from .params import check_setting
from .plan import plan_merge
from .run import execute_tasks

__all__ = ["merge_task_vectors"]

logger = logging.getLogger(__name__)


class _StateSource:
    """A state dict seen through the planner's :class:`~fusion.merging.plan.Source` interface."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = state
        self.names = list(state)

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self._state[name]
        return tensor.to(device=device, dtype=dtype or tensor.dtype)


def _per_model(value: Any, count: int, name: str) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * count
    values = list(value)
    if len(values) != count:
        raise MergeConfigError(f"{name} has {len(values)} entries but there are {count} models")
    return values


def _aligned(base: nn.Module, models: Sequence[nn.Module], example_inputs: Any, spec: Any) -> list[nn.Module]:
    from ..align import align
    from ..spec import permutation_spec

    if spec is None:
        if example_inputs is None:
            raise MergeConfigError("align_first=True needs example_inputs (or a spec) to trace the architecture")
        spec = permutation_spec(base, example_inputs)
    return [align(base, model, method="weight", spec=spec, progress=False).model for model in models]


def merge_task_vectors(
    base: nn.Module | None,
    models: Sequence[nn.Module],
    method: str = "task_arithmetic",
    weights: Sequence[float] | float | None = None,
    density: Sequence[float] | float | None = None,
    lambda_: float = 1.0,
    normalize: bool | None = None,
    seed: int = 0,
    *,
    t: float | None = None,
    gamma: Sequence[float] | float | None = None,
    rescale: bool | None = None,
    filter_wise: bool | None = None,
    parameters: Mapping[str, Any] | None = None,
    align_first: bool = False,
    example_inputs: Any = None,
    spec: Any = None,
) -> nn.Module:
    """Merge fine-tunes of ``base`` into a new model; ``base`` and ``models`` are not modified.

    Methods (names, parameters and defaults as in mergekit; see each kernel in
    :mod:`fusion.merging.methods` for its paper):

    * ``"task_arithmetic"`` (Ilharco et al. 2023): ``base + lambda * sum_i w_i (m_i - base)``;
    * ``"ties"`` (Yadav et al. 2023): keep each task vector's ``density`` largest entries, elect a
      sign per entry, average the agreeing entries;
    * ``"dare_linear"`` / ``"dare_ties"`` (Yu et al. 2024): drop entries at random (keep
      ``density``), rescale, then sum / TIES-merge;
    * ``"breadcrumbs"`` / ``"breadcrumbs_ties"`` (Davari & Belilovsky 2024): drop the ``gamma``
      largest and the smallest entries, keeping ``density``;
    * ``"model_stock"`` (Jang et al. 2024): interpolate base and average by the task vectors' angle;
    * ``"slerp"``: spherical interpolation from ``base`` (``t=0``) to the one model (``t=1``);
    * ``"linear"`` (Wortsman et al. 2022): weighted average of ``models`` (``base`` unused).

    Args:
        base: the common pretrained model (also the output's template; may be None for linear).
        models: the fine-tunes.
        method: one of the names above.
        weights: one weight per model (or one for all); default 1.0 each.
        density: fraction of each task vector kept, in (0, 1] (default 1.0: nothing dropped).
        lambda_: scale of the merged task vector (mergekit's ``lambda``).
        normalize: divide by the sum of weights; None takes the method's mergekit default (True
            for linear and ties, False for task arithmetic, DARE and breadcrumbs).
        seed: seed of DARE's random drop.
        t: slerp's interpolation factor.
        gamma: breadcrumbs' fraction of largest entries dropped (default 0.01).
        rescale: rescale sparsified task vectors to their L1 norm (default: True for DARE).
        filter_wise: Model Stock per output row.
        parameters: more settings in mergekit's form, by parameter name: a value, a gradient over
            layers, or a filter list such as ``{"t": [{"filter": "attn", "value": 0.3}, {"value": 0.7}]}``.
            Per-model settings go in ``{"weight": [...]}`` etc. via ``weights``/``density``/``gamma``.
        align_first: first align every model to ``base``'s basis by weight matching
            (:func:`fusion.align`) for fine-tunes whose hidden units were permuted or trained apart.
        example_inputs: inputs to trace the architecture (for ``align_first``).
        spec: a precomputed :class:`~fusion.PermutationSpec` of ``base`` (for ``align_first``).

    Returns:
        A new model: a deep copy of ``base`` (of ``models[0]`` without a base) holding the merge.

    Raises:
        MergeConfigError: unknown method or parameter, missing base, wrong number of weights,
            density outside (0, 1].
        ArchitectureMismatchError: the models do not share the base's tensors and shapes.
        NonFiniteWeightsError: an input holds NaN/inf.
    """
    merge_method = get_method(method)
    models = list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise MergeConfigError("models must be a non-empty sequence of nn.Module")
    if merge_method.needs_base and base is None:
        raise MergeConfigError(f"merge method {method!r} needs a base model (task vectors are taken from it)")
    if align_first:
        if base is None:
            raise MergeConfigError("align_first=True needs a base model to align to")
        models = _aligned(base, models, example_inputs, spec)
    count = len(models)
    per_model = {"weight": _per_model(weights, count, "weights"), "density": _per_model(density, count, "density"),
                 "gamma": _per_model(gamma, count, "gamma")}
    per_model = {k: v for k, v in per_model.items() if v is not None}
    if "weight" not in per_model and merge_method.parameter("weight") is not None:
        per_model["weight"] = [1.0] * count
    shared: dict[str, Any] = {"lambda": lambda_ if lambda_ != 1.0 else None, "normalize": normalize, "rescale": rescale,
                              "t": t, "filter_wise": filter_wise, **(parameters or {})}
    shared = {k: v for k, v in shared.items() if v is not None}
    for name, setting in shared.items():
        check_setting(name, setting, merge_method, "")
    inputs = []
    for i in range(count):
        own = {k: v[i] for k, v in per_model.items()}
        for name, setting in own.items():
            check_setting(name, setting, merge_method, f"model {i}: ")
        inputs.append(ModelInput(f"model{i}", None, own))
    template = base if base is not None else models[0]
    base_state = template.state_dict()
    states = {"base": base_state, **{f"model{i}": m.state_dict() for i, m in enumerate(models)}}
    for name, state in states.items():
        if set(state) != set(base_state):
            extra = sorted(set(state) ^ set(base_state))
            raise ArchitectureMismatchError(f"{name} and the base differ in their tensors (first: {extra[0]!r})")
    config = MergeConfig(merge_method, "base" if merge_method.needs_base else None, tuple(inputs), None, shared,
                         None, None)
    _check_contract(config)
    sources = {name: _StateSource(state) for name, state in states.items()}
    tasks, _ = plan_merge(config, sources)
    device = next(iter(base_state.values())).device if base_state else torch.device("cpu")
    merged = dict(execute_tasks(tasks, sources, merge_method, device=device, seed=seed))
    out = copy.deepcopy(template)
    out.load_state_dict(merged)
    return out
