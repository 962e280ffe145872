"""Models from the optional libraries Hugging Face ``transformers`` and ``timm``, built locally.

Three architecture names (see :func:`fusion.build_architecture`) reach them:

* ``"hf:<folder>"``: a folder written by ``save_pretrained`` (its ``config.json`` names the class);
* ``"hf-config:<Class>:<json>"``: a ``transformers`` model class built from a config given as JSON,
  e.g. ``'hf-config:GPT2LMHeadModel:{"n_embd": 64, "n_layer": 2, "n_head": 4}'``;
* ``"timm:<name>"``: ``timm.create_model(name, pretrained=False)``.

Nothing is ever downloaded: a name that would need the network (a hub id instead of a folder,
``pretrained=True``) raises :class:`~fusion.errors.CheckpointError` naming the model id. Both
libraries are imported only here, on first use (``pip install -e ".[hf]"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["EXTERNAL_PREFIXES", "build_external", "example_inputs_for", "is_external", "load_hf_folder"]

EXTERNAL_PREFIXES = ("hf:", "hf-config:", "timm:")


def is_external(name: str) -> bool:
    """Whether ``name`` names a ``transformers`` or ``timm`` model."""
    return isinstance(name, str) and name.strip().startswith(EXTERNAL_PREFIXES)


def _import(library: str, name: str) -> Any:
    try:
        return __import__(library)
    except ImportError as exc:
        raise CheckpointError(
            f"architecture {name!r} needs the optional package {library!r}: pip install -e \".[hf]\" ({exc})"
        ) from exc


def _no_download(name: str, model_id: str) -> CheckpointError:
    return CheckpointError(
        f"architecture {name!r}: {model_id!r} is not available locally and fusion never downloads weights; "
        f"save the model to a folder with save_pretrained (or pass pretrained=False) and name that instead"
    )


def _hf_folder(name: str, folder: str) -> Path:
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise _no_download(name, folder) if not path.exists() else CheckpointError(
            f"architecture {name!r}: {str(path)!r} has no config.json (expected a folder written by save_pretrained)")
    return path


def _hf_class(transformers: Any, config: Any, name: str) -> Any:
    architectures = getattr(config, "architectures", None) or []
    for class_name in architectures:
        if hasattr(transformers, class_name):
            return getattr(transformers, class_name)
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError as exc:
        raise CheckpointError(f"architecture {name!r}: no transformers model class for {type(config).__name__}") from exc


def load_hf_folder(folder: str | Path, weights: bool = True) -> nn.Module:
    """The ``transformers`` model saved in ``folder`` (with its weights, or freshly initialised).

    Raises:
        CheckpointError: no such folder (never downloaded), no config, or weights that do not load.
    """
    name = f"hf:{folder}"
    transformers = _import("transformers", name)
    path = _hf_folder(name, str(folder))
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        cls = _hf_class(transformers, config, name)
        if weights:
            return cls.from_pretrained(str(path), local_files_only=True)
        return cls(config)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"cannot build {name!r}: {exc}") from exc


def _hf_config_model(name: str, spec: str, kwargs: dict[str, Any]) -> nn.Module:
    transformers = _import("transformers", name)
    class_name, _, text = spec.partition(":")
    cls = getattr(transformers, class_name.strip(), None)
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "config_class"):
        raise CheckpointError(f"architecture {name!r}: transformers has no model class {class_name!r}")
    try:
        values = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise CheckpointError(f"architecture {name!r}: the config is not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise CheckpointError(f"architecture {name!r}: the config must be a JSON object, got {type(values).__name__}")
    try:
        return cls(cls.config_class(**{**values, **kwargs}))
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"cannot build architecture {name!r}: {exc}") from exc


def _timm_model(name: str, model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    timm = _import("timm", name)
    if kwargs.get("pretrained"):
        raise _no_download(name, model_name)
    if model_name not in timm.list_models():
        raise CheckpointError(f"architecture {name!r}: timm has no model {model_name!r}")
    try:
        return timm.create_model(model_name, **{**kwargs, "pretrained": False})
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"cannot build architecture {name!r} with arguments {kwargs}: {exc}") from exc


def build_external(name: str, num_classes: int | None = None, input_shape: tuple[int, ...] | None = None,
                   **kwargs: Any) -> nn.Module:
    """A freshly initialised ``transformers``/``timm`` model named ``hf:``, ``hf-config:`` or ``timm:``.

    ``num_classes`` and ``input_shape`` apply to timm (``num_classes``, ``in_chans`` unless
    ``kwargs`` sets them); a ``transformers`` config carries its own sizes (``kwargs`` are
    config fields for ``hf-config:``).
    """
    name = name.strip()
    prefix, _, rest = name.partition(":")
    if prefix == "hf":
        if kwargs:
            raise CheckpointError(f"architecture {name!r}: a saved folder takes no arguments, got {sorted(kwargs)}")
        return load_hf_folder(rest, weights=False)
    if prefix == "hf-config":
        return _hf_config_model(name, rest, dict(kwargs))
    arguments = dict(kwargs)
    if num_classes is not None:
        arguments.setdefault("num_classes", int(num_classes))
    if input_shape and len(input_shape) == 3:
        arguments.setdefault("in_chans", int(input_shape[0]))
    return _timm_model(name, rest.strip(), arguments)


def example_inputs_for(model: nn.Module, count: int, shape: tuple[int, ...], generator: torch.Generator) -> Any:
    """Random inputs of ``shape`` (one sample) in the form ``model`` takes.

    A ``transformers`` model whose main input is token ids gets ``{"input_ids": ...}`` of length
    ``shape[-1]`` drawn from its vocabulary; one with another main input (``pixel_values``,
    ``input_values``, ``input_features``) gets that keyword with a normal float tensor; any other
    model a plain float tensor.
    """
    main = getattr(model, "main_input_name", None)
    if main is None or not hasattr(model, "config"):
        return torch.randn((count, *shape), generator=generator)
    if main == "input_ids":
        vocab = int(getattr(model.config, "vocab_size", 0) or 2)
        return {"input_ids": torch.randint(0, vocab, (count, int(shape[-1])), generator=generator)}
    return {main: torch.randn((count, *shape), generator=generator)}
