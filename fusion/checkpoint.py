"""Build models by name and load/save their weights (``torch.save`` state dicts or ``.safetensors``).

A model is named in one of three ways:

* a reference model of :mod:`fusion.models`: ``"mlp"``, ``"vgg"``, ``"resnet"``;
* a torchvision model: ``"resnet18"``, ``"vit_b_16"``, ... (built without pretrained weights);
* ``"module:Class"`` (or ``"module:function"``): any importable constructor, e.g. ``"my_pkg.nets:Net"``;
* ``"hf:<folder>"``, ``"hf-config:<Class>:<json>"``, ``"timm:<name>"``: Hugging Face and timm models,
  built locally, never downloaded (see :mod:`fusion.external`; optional extra ``hf``). A folder
  written by ``save_pretrained`` is also accepted as a checkpoint by :func:`load_model`.

Checkpoints hold only a state dict. Files ending in ``.safetensors`` are read and written with
safetensors (and may carry string metadata, e.g. the architecture); every other file with
``torch.save`` / ``torch.load(weights_only=True)``. A state dict wrapped in a training checkpoint
(``{"epoch": ..., "model_state": ...}``, ``{"state_dict": ...}``, ``{"model_state_dict": ...}``,
``{"model": ...}``; see :data:`WRAPPER_KEYS`) and the ``module.`` prefix of DataParallel /
DistributedDataParallel are accepted on reading; the log (INFO) says which wrapper key was used.
Writes are atomic (temporary file + ``os.replace``).

Every failure (missing or unreadable file, unknown architecture, a state dict that does not fit)
raises :class:`~fusion.errors.CheckpointError` with the path or name at fault.

Example:
    >>> model = build_architecture("resnet", input_shape=(1, 8, 8), num_classes=10)
    >>> save_model(model, "out/model.safetensors", metadata=architecture_metadata("resnet"))  # doctest: +SKIP
    >>> same = load_model("out/model.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis.io import atomic_path
from .errors import CheckpointError
from .external import build_external, is_external, load_hf_folder
from .models import MODELS

__all__ = [
    "ARCH_KEY",
    "KWARGS_KEY",
    "WRAPPER_KEYS",
    "architecture_metadata",
    "build_architecture",
    "load_model",
    "load_state_dict",
    "read_metadata",
    "resolve_constructor",
    "save_model",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: Metadata keys of a ``.safetensors`` checkpoint naming its architecture (see :func:`architecture_metadata`).
ARCH_KEY = "fusion.arch"
KWARGS_KEY = "fusion.arch_kwargs"

#: Keys under which training checkpoints commonly wrap the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network", "weights")


def _is_safetensors(path: PathLike) -> bool:
    return str(path).endswith(".safetensors")


def _torchvision_names() -> list[str]:
    import torchvision.models

    return sorted(torchvision.models.list_models())


def resolve_constructor(name: str) -> Callable[..., nn.Module]:
    """The callable that builds architecture ``name`` (reference model, torchvision name or ``module:Class``).

    Raises:
        CheckpointError: the name is empty, the module cannot be imported, the attribute does not
            exist or is not callable, or the name is neither a reference nor a torchvision model
            (the message lists close names).
    """
    if not isinstance(name, str) or not name.strip():
        raise CheckpointError(f"an architecture name must be a non-empty string, got {name!r}")
    name = name.strip()
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise CheckpointError(f"architecture {name!r}: cannot import module {module_name!r} ({exc})") from exc
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise CheckpointError(f"architecture {name!r}: {module_name!r} has no attribute {attribute!r}")
            target = getattr(target, part)
        if not callable(target):
            raise CheckpointError(f"architecture {name!r}: {attribute!r} is not a class or function")
        return target
    if name.lower() in MODELS:
        return MODELS[name.lower()]
    import torchvision.models

    names = _torchvision_names()
    if name in names:
        return torchvision.models.get_model_builder(name)  # builds without weights by default
    close = difflib.get_close_matches(name, [*MODELS, *names], n=4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise CheckpointError(
        f"unknown architecture {name!r}: not a reference model ({', '.join(MODELS)}), not a torchvision model "
        f"and not of the form 'module:Class'{hint}"
    )


def _accepts(constructor: Callable[..., Any], argument: str, via_kwargs: bool) -> bool:
    """Whether ``constructor`` takes the keyword ``argument`` (or, with ``via_kwargs``, any ``**kwargs``)."""
    try:
        parameters = inspect.signature(constructor).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == argument or (via_kwargs and p.kind is inspect.Parameter.VAR_KEYWORD) for p in parameters)


def build_architecture(
    name: str,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A freshly initialised model of architecture ``name`` (no pretrained weights).

    Args:
        name: reference model (``"mlp"``, ``"vgg"``, ``"resnet"``), torchvision name or ``"module:Class"``.
        num_classes: number of outputs, passed as ``num_classes=`` when the constructor accepts it
            (torchvision builders take it through ``**kwargs``).
        input_shape: shape of one input without the batch dimension, e.g. ``(1, 8, 8)``; fills
            ``in_channels`` (``input_shape[0]``) and ``in_features`` (the product) when the
            constructor accepts them and ``kwargs`` does not set them.
        **kwargs: further constructor arguments (they win over the two above).

    Returns:
        The model, in train mode, on the CPU.

    Raises:
        CheckpointError: unknown name, or the constructor rejected the arguments or returned no nn.Module.
    """
    if is_external(name):
        return build_external(name, num_classes, input_shape, **kwargs)
    constructor = resolve_constructor(name)
    arguments = dict(kwargs)
    if num_classes is not None and "num_classes" not in arguments and _accepts(constructor, "num_classes", True):
        arguments["num_classes"] = int(num_classes)
    if input_shape:
        shape = tuple(int(s) for s in input_shape)
        if "in_channels" not in arguments and len(shape) > 1 and _accepts(constructor, "in_channels", False):
            arguments["in_channels"] = shape[0]
        if "in_features" not in arguments and _accepts(constructor, "in_features", False):
            arguments["in_features"] = int(torch.tensor(shape).prod())
    try:
        model = constructor(**arguments)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"cannot build architecture {name!r} with arguments {arguments}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"architecture {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    return path


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded object (plain, wrapped in a training checkpoint, DataParallel-prefixed)."""
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in WRAPPER_KEYS if _is_state_dict(obj.get(k))), None)
        if key is None:  # any other single entry holding a state dict
            found = [k for k, v in obj.items() if _is_state_dict(v)]
            key = found[0] if len(found) == 1 else None
        if key is not None:
            logger.info("checkpoint %s: using the state dict under key %r (other keys: %s)", path, key,
                        sorted(str(k) for k in obj if k != key))
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        keys = f" (keys: {sorted(map(str, obj))[:8]})" if isinstance(obj, Mapping) else ""
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}{keys}, not a non-empty state "
                              f"dict; state dicts are also found under the keys {', '.join(WRAPPER_KEYS)}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a state dict: entry {bad[0]!r} is not a tensor; "
                              f"state dicts are also found under the keys {', '.join(WRAPPER_KEYS)}")
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):  # DataParallel / DistributedDataParallel, torch.compile
        if all(k.startswith(prefix) for k in state):
            logger.info("checkpoint %s: removing the %r prefix of every key", path, prefix)
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _first_sentence(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0] if text else type(exc).__name__
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def load_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict (CPU tensors) from a ``torch.save`` file or a ``.safetensors`` file.

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no state dict.
    """
    path = _check_file(path)
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read safetensors checkpoint {str(path)!r}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: torch.load(weights_only=True) failed ({_first_sentence(exc)}); "
            "expected a state dict saved with torch.save(model.state_dict(), path) or a .safetensors file"
        ) from exc
    return _unwrap(obj, path)


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata stored in a ``.safetensors`` header (``{}`` for other formats or none stored)."""
    path = _check_file(path)
    if not _is_safetensors(path):
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read safetensors checkpoint {str(path)!r}: {exc}") from exc


def architecture_metadata(name: str, **kwargs: Any) -> dict[str, str]:
    """Metadata naming an architecture, to store with :func:`save_model` so :func:`load_model` needs no name."""
    return {ARCH_KEY: name, KWARGS_KEY: json.dumps(kwargs, sort_keys=True)}


def _check_fit(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, name: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) (checkpoint vs model: {'; '.join(wrong[:3])})")
    if problems:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit architecture {name!r}: {', '.join(problems)}; "
            "check the architecture name and its arguments (num_classes, width, ...)"
        )


def load_model(
    path: PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> nn.Module:
    """Build architecture ``arch`` and load the checkpoint at ``path`` into it (strictly).

    Args:
        path: a ``torch.save`` state dict, a ``.safetensors`` file, or a folder written by a
            ``transformers`` model's ``save_pretrained`` (its own config then names the class).
        arch: the architecture (see :func:`build_architecture`); may be omitted for a ``.safetensors``
            file written with :func:`architecture_metadata`, whose stored arguments then apply too.
        num_classes, input_shape, **kwargs: as for :func:`build_architecture`.
        device: where to put the model.

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: unreadable file, unknown architecture, or a state dict with other keys or shapes.
    """
    if Path(path).is_dir() and (Path(path) / "config.json").is_file():  # a save_pretrained folder
        folder_model = load_hf_folder(path)
        if arch is not None:
            _check_fit(build_architecture(arch, num_classes, input_shape, **kwargs), folder_model.state_dict(),
                       Path(path), arch)
        return folder_model.to(device).eval()
    path = _check_file(path)
    if arch is None:
        metadata = read_metadata(path)
        if ARCH_KEY not in metadata:
            raise CheckpointError(f"checkpoint {str(path)!r} does not name its architecture; pass the architecture")
        arch = metadata[ARCH_KEY]
        try:
            kwargs = {**json.loads(metadata.get(KWARGS_KEY, "{}")), **kwargs}
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} has unreadable architecture arguments: {exc}") from exc
    num_classes = kwargs.pop("num_classes", num_classes)  # stored or explicit constructor arguments win
    state = load_state_dict(path)
    model = build_architecture(arch, num_classes=num_classes, input_shape=input_shape, **kwargs)
    _check_fit(model, state, path, arch)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def save_model(
    model: nn.Module | Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a model's state dict to ``path`` atomically (``.safetensors`` by suffix, else ``torch.save``).

    Args:
        model: a module or a state dict.
        path: destination; parent folders are created.
        metadata: string key/values stored in a ``.safetensors`` header (ignored, with a log
            message, for ``torch.save`` files, which hold a plain state dict).

    Returns:
        The path written.

    Raises:
        CheckpointError: the destination cannot be written or ``metadata`` is not all strings.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = dict(metadata or {})
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"checkpoint metadata must map strings to strings, got {metadata!r}")
    try:
        with atomic_path(path) as tmp:
            if _is_safetensors(path):
                from safetensors.torch import save_file

                # safetensors refuses tensors that share memory: give each its own copy.
                save_file({k: v.clone() for k, v in tensors.items()}, str(tmp), metadata=metadata or None)
            else:
                if metadata:
                    logger.info("metadata is not stored in torch.save checkpoints: %s", sorted(metadata))
                torch.save(tensors, tmp)
    except OSError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: {exc}") from exc
    return Path(path)
