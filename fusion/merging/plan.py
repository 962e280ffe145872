"""From a merge configuration and the input models to a list of per-tensor merge tasks.

Layers are found from tensor names: the prefix followed by a number that numbers the most blocks
(``model.layers.<i>.`` for LLaMA, ``transformer.h.<i>.`` for GPT-2) is the layer stack. Gradient
parameters are interpolated over the layers of a slice (``t = i / (n - 1)`` at its ``i``-th layer);
tensors outside the stack take ``t = 0``, as in mergekit. For ``slices``, output layers are
renumbered consecutively; tensors before the stack (embeddings: a name containing ``embed``,
``wte`` or ``wpe``) come from the first slice's sources, the others (final norm, head) from the
last slice's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import ArchitectureMismatchError, MergeConfigError
from .config import MergeConfig, ModelInput
from .methods import MergeMethod
from .params import resolve_parameters

__all__ = ["LayerLayout", "MergeTask", "Source", "plan_merge"]

_NUMBERED = re.compile(r"^(?P<prefix>(?:.*\.)?)(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = ("embed", "wte", "wpe")


class Source(Protocol):
    """What the planner needs of a model: tensor names, shapes, reading."""

    names: list[str]

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class LayerLayout:
    """The layer stack of a model: ``prefix<i>.rest`` for ``i`` in ``indices``."""

    prefix: str | None
    indices: tuple[int, ...]
    rests: tuple[str, ...]
    pre: tuple[str, ...]
    post: tuple[str, ...]

    @classmethod
    def of(cls, names: Sequence[str], num_layers: int | None = None) -> LayerLayout:
        matches = {name: _NUMBERED.match(name) for name in names}
        by_prefix: dict[str, set[int]] = {}
        for match in filter(None, matches.values()):
            by_prefix.setdefault(match["prefix"], set()).add(int(match["index"]))
        if not by_prefix:
            return cls(None, (), (), tuple(names), ())
        prefix = max(by_prefix, key=lambda p: len(by_prefix[p]))
        indices = tuple(range(num_layers)) if num_layers is not None else tuple(sorted(by_prefix[prefix]))
        inside = {n for n, m in matches.items() if m and m["prefix"] == prefix}
        rests = tuple(dict.fromkeys(matches[n]["rest"] for n in names if n in inside))
        pre = tuple(n for n in names if n not in inside and any(key in n for key in _PRE))
        post = tuple(n for n in names if n not in inside and n not in pre)
        return cls(prefix, indices, rests, pre, post)

    def layer(self, index: int) -> list[str]:
        return [f"{self.prefix}{index}.{rest}" for rest in self.rests]

    def position(self, name: str) -> float:
        """``t`` of a tensor: its layer's position in the stack (1 in a one-layer stack), 0 outside it."""
        match = _NUMBERED.match(name)
        if not match or match["prefix"] != self.prefix or int(match["index"]) not in self.indices:
            return 0.0
        if len(self.indices) == 1:
            return 1.0
        return self.indices.index(int(match["index"])) / (len(self.indices) - 1)


@dataclass(frozen=True)
class MergeTask:
    """One output tensor: which tensors of which models go in, with resolved parameters."""

    output: str
    models: tuple[str, ...]
    inputs: tuple[str, ...]
    has_base: bool
    shared: Mapping[str, Any]
    per_input: tuple[Mapping[str, Any], ...]


def _ordered(method: MergeMethod, sources: Sequence[ModelInput], base: str | None) -> tuple[list[ModelInput], bool]:
    """Inputs with the base first (methods that use one), the others in their configured order."""
    if not method.needs_base:
        return list(sources), False
    own = next((s for s in sources if s.model == base), None)
    others = [s for s in sources if s.model != base]
    return [own or ModelInput(base, sources[0].layer_range)] + others, True


def _task(config: MergeConfig, output: str, names: Sequence[str], inputs: Sequence[ModelInput], has_base: bool,
          slice_params: Mapping[str, Any] | None, t: float) -> MergeTask:
    shared_scopes = (slice_params, config.parameters)
    input_scopes = [(s.parameters, slice_params, config.parameters) for s in inputs]
    shared, per_input = resolve_parameters(config.method, output, names, input_scopes, shared_scopes, t,
                                           0 if has_base else None, [s.model for s in inputs])
    return MergeTask(output, tuple(s.model for s in inputs), tuple(names), has_base, shared, tuple(per_input))


def _num_layers(source: Any) -> int | None:
    config = getattr(source, "config", None) or {}
    value = config.get("num_hidden_layers", config.get("n_layer"))
    return value if isinstance(value, int) else None


def plan_merge(config: MergeConfig, sources: Mapping[str, Source]) -> tuple[list[MergeTask], int | None]:
    """The tasks of a merge in output order, and the output's number of layers (for slices).

    Raises:
        ArchitectureMismatchError: an input lacks a tensor or holds it with another shape.
        MergeConfigError: a required parameter has no value for some tensor.
    """
    method = config.method
    if config.models is not None:
        inputs, has_base = _ordered(method, config.models, config.base_model)
        reference = sources[inputs[0].model]
        layout = LayerLayout.of(reference.names)
        tasks = [_task(config, name, [name] * len(inputs), inputs, has_base, None, layout.position(name))
                 for name in reference.names]
        out_layers = None
    else:
        tasks, out_layers = _plan_slices(config, sources)
    _check_inputs(tasks, sources)
    return tasks, out_layers


def _plan_slices(config: MergeConfig, sources: Mapping[str, Source]) -> tuple[list[MergeTask], int]:
    layouts = {name: LayerLayout.of(src.names, _num_layers(src)) for name, src in sources.items()}
    slices = config.slices or ()
    for out in slices:
        for s in out.sources:
            layout = layouts[s.model]
            if layout.prefix is None or s.layer_range[1] > len(layout.indices):
                raise MergeConfigError(f"line {s.line}: layer_range {list(s.layer_range)} of {s.model!r} is outside its "
                                       f"{len(layout.indices)} layers")
    tasks: list[MergeTask] = []
    first, last = slices[0], slices[-1]

    def outside(out: Any, names: Sequence[str]) -> None:
        inputs, has_base = _ordered(config.method, out.sources, out.base_model or config.base_model)
        for name in names:
            tasks.append(_task(config, name, [name] * len(inputs), inputs, has_base, out.parameters, 0.0))

    outside(first, layouts[first.sources[0].model].pre)
    out_index = 0
    out_prefix = layouts[first.sources[0].model].prefix
    for out in slices:
        inputs, has_base = _ordered(config.method, out.sources, out.base_model or config.base_model)
        count = out.sources[0].layer_range[1] - out.sources[0].layer_range[0]
        for offset in range(count):
            t = offset / (count - 1) if count > 1 else 1.0
            per_model = [layouts[s.model].layer(s.layer_range[0] + offset) for s in inputs]
            for j, rest in enumerate(layouts[inputs[0].model].rests):
                names = [layer[j] for layer in per_model]
                tasks.append(_task(config, f"{out_prefix}{out_index}.{rest}", names, inputs, has_base, out.parameters, t))
            out_index += 1
    outside(last, layouts[last.sources[0].model].post)
    return tasks, out_index


def _check_inputs(tasks: Sequence[MergeTask], sources: Mapping[str, Source]) -> None:
    for task in tasks:
        shapes = []
        for model, name in zip(task.models, task.inputs):
            if name not in sources[model]:
                raise ArchitectureMismatchError(f"model {model!r} has no tensor {name!r} (needed for {task.output!r}); "
                                                "the inputs must share one architecture")
            shapes.append(sources[model].shape(name))
        if len(set(shapes)) > 1:
            listed = ", ".join(f"{m}: {tuple(s)}" for m, s in zip(task.models, shapes))
            raise ArchitectureMismatchError(f"tensor {task.output!r} has different shapes across the inputs ({listed})")
