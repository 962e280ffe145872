"""Per-tensor parameter values from mergekit-style settings: scalars, gradients and filter lists.

A *setting* is what a YAML config (or ``merge_task_vectors(parameters=...)``) gives for one
parameter:

* a scalar (``0.5``);
* a *gradient*, a list of numbers interpolated linearly over the layers of a slice (the first value
  at its first layer, the last at its last; tensors outside the layers take the first value);
* a filter list, ``[{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]``: the first entry
  whose ``filter`` is a substring of the tensor name (or that has no filter, or ``"*"``) applies,
  and its ``value`` may itself be a gradient.

Settings are looked up from the most specific scope to the least (a model's own parameters, then
its slice's, then the global ones); the method's default applies when none gives a value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import MergeConfigError
from .methods import INPUT, NON_BASE, SHARED, MergeMethod, ParameterSpec

__all__ = ["check_setting", "evaluate_setting", "resolve_parameters"]

Settings = Mapping[str, Any] | None
_SCALARS = (bool, int, float, str)


def _convert(value: Any, kind: type, name: str) -> Any:
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise MergeConfigError(f"parameter {name!r} must be true or false, got {value!r}")
    if isinstance(value, bool):
        raise MergeConfigError(f"parameter {name!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MergeConfigError(f"parameter {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise MergeConfigError(f"parameter {name!r} must be finite, got {value!r}")
    return number


def evaluate_setting(setting: Any, tensor_name: str, t: float, kind: type = float, name: str = "value") -> Any:
    """The value of one setting for the tensor ``tensor_name`` at layer position ``t`` in [0, 1]."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, _SCALARS) or setting is None:
        return _convert(setting, kind, name)
    if not isinstance(setting, (list, tuple)) or not setting:
        return None
    if all(isinstance(e, _SCALARS) for e in setting):
        values = [_convert(e, kind, name) for e in setting]
        if kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * values[low] + frac * values[high]
    for condition in setting:
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(condition.get("value"), tensor_name, t, kind, name)
    return None


def _leaves(setting: Any) -> Iterable[Any]:
    if isinstance(setting, Mapping):
        yield from _leaves(setting.get("value"))
    elif isinstance(setting, (list, tuple)):
        for item in setting:
            yield from _leaves(item)
    else:
        yield setting


_RANGES = {"density": (0.0, 1.0, False), "gamma": (0.0, 1.0, True), "t": (-math.inf, math.inf, True)}


def check_setting(name: str, setting: Any, method: MergeMethod, where: str = "") -> None:
    """Reject a setting the method does not know, of the wrong shape, or out of range.

    Densities must lie in (0, 1]; ``gamma`` in [0, 1]; every number must be finite.
    """
    spec = method.parameter(name)
    if spec is None:
        known = ", ".join(p.name for p in method.parameters) or "none"
        raise MergeConfigError(f"{where}unknown parameter {name!r} for merge method {method.name!r} (known: {known})")
    if isinstance(setting, (list, tuple)):
        kinds = {isinstance(e, Mapping) for e in setting}
        if len(kinds) > 1:
            raise MergeConfigError(f"{where}parameter {name!r} mixes plain values and filter entries in one list")
        for entry in setting:
            if isinstance(entry, Mapping) and (set(entry) - {"filter", "value"} or "value" not in entry):
                raise MergeConfigError(f"{where}parameter {name!r}: a filter entry needs 'value' and at most 'filter', "
                                       f"got keys {sorted(entry)}")
    for leaf in _leaves(setting):
        value = _convert(leaf, spec.kind, name)
        if value is None or spec.kind is bool:
            continue
        low, high, closed = _RANGES.get(name, (-math.inf, math.inf, True))
        if not (low <= value <= high) or (not closed and value == low):
            interval = f"[{low}, {high}]" if closed else f"({low}, {high}]"
            raise MergeConfigError(f"{where}parameter {name}={leaf!r} is outside {interval}")


def _resolve(spec: ParameterSpec, scopes: Sequence[Settings], tensor_name: str, t: float, owner: str) -> Any:
    for scope in scopes:
        if scope is not None and spec.name in scope:
            value = evaluate_setting(scope[spec.name], tensor_name, t, spec.kind, spec.name)
            if value is not None:
                return value
    if spec.required:
        raise MergeConfigError(f"missing required parameter {spec.name!r} for {owner}{tensor_name}")
    return spec.default


def resolve_parameters(method: MergeMethod, output_name: str, input_names: Sequence[str],
                       input_scopes: Sequence[Sequence[Settings]], shared_scopes: Sequence[Settings], t: float,
                       base_index: int | None, labels: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Shared and per-input parameter values of one output tensor.

    ``input_scopes[i]`` are input ``i``'s settings from most to least specific; ``shared_scopes``
    those of the tensor as a whole. The base gets only ``input``-scoped parameters.
    """
    shared = {p.name: _resolve(p, shared_scopes, output_name, t, "") for p in method.parameters if p.scope == SHARED}
    per_input = []
    for i, (name, scopes) in enumerate(zip(input_names, input_scopes)):
        wanted = (INPUT,) if i == base_index else (INPUT, NON_BASE)
        per_input.append({p.name: _resolve(p, scopes, name, t, f"model {labels[i]!r}, tensor ")
                          for p in method.parameters if p.scope in wanted})
    return shared, per_input
