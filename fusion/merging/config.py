"""mergekit-style YAML merge configurations, read and checked with line numbers.

Understood keys (as in mergekit): ``merge_method``, ``base_model``, ``models`` (entries
``{model, parameters}`` or a bare path), ``slices`` (entries ``{sources: [{model, layer_range,
parameters}], base_model, parameters}``), ``parameters``, ``dtype``, ``out_dtype``. Keys about the
tokenizer (``tokenizer_source``, ``tokenizer``, ``chat_template``) are accepted and ignored with a
note: the output keeps the base's vocabulary. Any other key is an error naming the key and its line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import MergeConfigError
from .methods import MergeMethod, get_method
from .params import check_setting

__all__ = ["MergeConfig", "ModelInput", "OutputSlice", "load_config", "parse_config"]

_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype"}
_IGNORED_KEYS = {"tokenizer_source", "tokenizer", "chat_template"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Lined(dict):
    """A mapping that remembers the line of each key."""

    lines: dict[str, int]
    line: int


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> _Lined:  # type: ignore[override]
        mapping = _Lined(super().construct_mapping(node, deep=True))
        mapping.lines = {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}
        mapping.line = node.start_mark.line + 1
        return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)


@dataclass(frozen=True)
class ModelInput:
    """One input model of a slice: its path, layer range (None: all layers) and own parameters."""

    model: str
    layer_range: tuple[int, int] | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    line: int = 0


@dataclass(frozen=True)
class OutputSlice:
    """A run of output layers merged from the same layers of its sources."""

    sources: tuple[ModelInput, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    """A checked merge configuration."""

    method: MergeMethod
    base_model: str | None
    models: tuple[ModelInput, ...] | None
    slices: tuple[OutputSlice, ...] | None
    parameters: Mapping[str, Any]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    notes: tuple[str, ...] = ()
    text: str = ""
    lines: Mapping[str, int] = field(default_factory=dict)

    def referenced_models(self) -> list[str]:
        """Every model path named, base first, without repeats."""
        names = [self.base_model] if self.base_model else []
        for source in self.models or ():
            names.append(source.model)
        for out in self.slices or ():
            names.extend([out.base_model] if out.base_model else [])
            names.extend(s.model for s in out.sources)
        return list(dict.fromkeys(names))


def _at(mapping: Any, key: str | None = None) -> str:
    lines = getattr(mapping, "lines", {})
    line = lines.get(key) if key is not None else getattr(mapping, "line", None)
    return f"line {line}: " if line else ""


def _check_keys(mapping: Any, allowed: set[str], what: str) -> None:
    if not isinstance(mapping, Mapping):
        raise MergeConfigError(f"{what} must be a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            raise MergeConfigError(f"{_at(mapping, key)}unknown key {key!r} in {what} (understood: {', '.join(sorted(allowed))})")


def _parameters(owner: Any, method: MergeMethod, what: str) -> dict[str, Any]:
    params = owner.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise MergeConfigError(f"{_at(owner, 'parameters')}'parameters' of {what} must be a mapping")
    for name, setting in params.items():
        check_setting(name, setting, method, _at(params, name))
    return dict(params)


def _model_path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise MergeConfigError(f"{where}a model must be a path, got {value!r}")
    return value


def _model_input(entry: Any, method: MergeMethod, slice_entry: bool) -> ModelInput:
    if isinstance(entry, str):
        return ModelInput(entry)
    allowed = {"model", "parameters"} | ({"layer_range"} if slice_entry else set())
    _check_keys(entry, allowed, "a model entry")
    if "model" not in entry:
        raise MergeConfigError(f"{_at(entry)}a model entry needs 'model'")
    model = _model_path(entry["model"], _at(entry, "model"))
    layers = None
    if slice_entry:
        raw = entry.get("layer_range")
        if not (isinstance(raw, list) and len(raw) == 2 and all(isinstance(v, int) for v in raw) and 0 <= raw[0] < raw[1]):
            raise MergeConfigError(f"{_at(entry, 'layer_range') or _at(entry)}layer_range must be [start, end) with "
                                   f"0 <= start < end, got {raw!r}")
        layers = (raw[0], raw[1])
    return ModelInput(model, layers, _parameters(entry, method, f"model {model!r}"), getattr(entry, "line", 0))


def _dtype(raw: Mapping[str, Any], key: str) -> torch.dtype | None:
    value = raw.get(key)
    if value is None:
        return None
    if value not in _DTYPES:
        raise MergeConfigError(f"{_at(raw, key)}{key} {value!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[value]


def parse_config(text: str) -> MergeConfig:
    """Parse and check the YAML text of a merge configuration."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise MergeConfigError(f"the merge configuration is not valid YAML: {' '.join(str(exc).split())}") from exc
    _check_keys(raw, _TOP_KEYS | _IGNORED_KEYS, "the merge configuration")
    if "merge_method" not in raw:
        raise MergeConfigError("the merge configuration needs 'merge_method'")
    try:
        method = get_method(str(raw["merge_method"]))
    except MergeConfigError as exc:
        raise MergeConfigError(f"{_at(raw, 'merge_method')}{exc}") from None
    notes = tuple(f"{key!r} ignored: the output keeps the base model's tokenizer and vocabulary"
                  for key in raw if key in _IGNORED_KEYS)
    base = _model_path(raw["base_model"], _at(raw, "base_model")) if raw.get("base_model") is not None else None
    if ("models" in raw) == ("slices" in raw):
        raise MergeConfigError("the merge configuration needs exactly one of 'models' and 'slices'")
    models = slices = None
    if "models" in raw:
        if not isinstance(raw["models"], list) or not raw["models"]:
            raise MergeConfigError(f"{_at(raw, 'models')}'models' must be a non-empty list")
        models = tuple(_model_input(entry, method, slice_entry=False) for entry in raw["models"])
    else:
        if not isinstance(raw["slices"], list) or not raw["slices"]:
            raise MergeConfigError(f"{_at(raw, 'slices')}'slices' must be a non-empty list")
        built = []
        for entry in raw["slices"]:
            _check_keys(entry, {"sources", "base_model", "parameters", "residual_weight"}, "a slice")
            if entry.get("residual_weight") is not None:
                raise MergeConfigError(f"{_at(entry, 'residual_weight')}residual_weight is not supported")
            sources = entry.get("sources")
            if not isinstance(sources, list) or not sources:
                raise MergeConfigError(f"{_at(entry)}a slice needs a non-empty 'sources' list")
            inputs = tuple(_model_input(s, method, slice_entry=True) for s in sources)
            lengths = {s.layer_range[1] - s.layer_range[0] for s in inputs}
            if len(lengths) > 1:
                raise MergeConfigError(f"{_at(entry)}the sources of a slice must span equally many layers, got "
                                       f"{[list(s.layer_range) for s in inputs]}")
            slice_base = entry.get("base_model")
            built.append(OutputSlice(inputs, _model_path(slice_base, _at(entry, "base_model")) if slice_base else None,
                                     _parameters(entry, method, "a slice")))
        slices = tuple(built)
    config = MergeConfig(method, base, models, slices, _parameters(raw, method, "the configuration"),
                         _dtype(raw, "dtype"), _dtype(raw, "out_dtype"), notes, text, dict(raw.lines))
    _check_contract(config)
    return config


def _check_contract(config: MergeConfig) -> None:
    method = config.method
    groups = [(config.base_model, config.models)] if config.models else [
        (s.base_model or config.base_model, s.sources) for s in config.slices or ()]
    for base, sources in groups:
        names = [s.model for s in sources]
        if method.needs_base and not base:
            raise MergeConfigError(f"merge method {method.name!r} needs a base_model (the model the task vectors are "
                                   "taken from)")
        if len(set(names)) != len(names):
            raise MergeConfigError(f"a model is listed twice among the inputs: {names}")
        count = len(set(names) | ({base} if method.needs_base else set()))
        if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
            wanted = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs
                      else f"at least {method.min_inputs}")
            raise MergeConfigError(f"merge method {method.name!r} takes {wanted} models (base included), got {count}")


def load_config(path: str | Path) -> MergeConfig:
    """Read and check a merge configuration file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MergeConfigError(f"cannot read merge configuration {str(path)!r}: {exc.strerror or exc}") from exc
    return parse_config(text)
