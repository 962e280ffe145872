"""Helpers of :class:`~fusion.inspect.bend.Inspector`: graph nodes applying bends, method calls, input forms, checks."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..checks import describe_shapes
from ..errors import BendingError, ExampleInputError, FusionError
from .callbacks import BendingCallback
from .tables import tensor_meta

__all__ = [
    "ActivationBend",
    "MethodCall",
    "ShapeRecorder",
    "apply_chain",
    "call_inputs",
    "checked_call",
    "flat_names",
    "fullmatch",
    "invoke",
    "is_names",
]


def apply_chain(callbacks: Sequence[BendingCallback], value: Any, name: str) -> Any:
    for callback in callbacks:
        if not isinstance(value, torch.Tensor):
            raise BendingError(
                f"activation {name!r} is a {type(value).__name__}, not a tensor; bend one of its elements "
                "(a getitem node) instead"
            )
        value = callback(value, name)
    return value


class ActivationBend(nn.Module):
    """Graph node applying a chain of callbacks to one activation."""

    def __init__(self, name: str, callbacks: Sequence[BendingCallback]) -> None:
        super().__init__()
        self.activation = name
        self.callbacks = tuple(callbacks)

    def forward(self, value: Any) -> Any:
        return apply_chain(self.callbacks, value, self.activation)


class MethodCall(nn.Module):
    """``forward`` runs ``inner.<method>``, so that ``functional_call`` can run any method of a model."""

    def __init__(self, inner: nn.Module, method: str) -> None:
        super().__init__()
        self.inner = inner
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, self.method)(*args, **kwargs)


class ShapeRecorder(fx.Interpreter):
    """Interpreter recording a description of every node's value."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.shapes: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.op != "output":
            self.shapes[n.name] = tensor_meta(value)
        return value


def call_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Normalise inputs: one tuple/list positional = the arguments, one dict positional = keyword arguments."""
    if len(args) == 1 and not kwargs:
        if isinstance(args[0], (tuple, list)):
            return tuple(args[0]), {}
        if isinstance(args[0], dict):
            return (), dict(args[0])
    return tuple(args), dict(kwargs)


def flat_names(names: Sequence[Any]) -> list[str]:
    flat: list[str] = []
    for name in names:
        flat.extend([name] if isinstance(name, str) else list(name))
    return flat


def is_names(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)
    )


def invoke(run: Callable[[], Any], args: tuple, kwargs: dict) -> Any:
    """``run()``, re-raising the model's shape/dtype errors as :class:`ExampleInputError` naming the input shapes."""
    try:
        return run()
    except FusionError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shapes = describe_shapes((*args, kwargs) if kwargs else args)
        raise ExampleInputError(f"the model rejected inputs of shape {shapes}: {exc}") from exc


def checked_call(callback: BendingCallback, tensor: torch.Tensor, name: str, kind: str) -> torch.Tensor:
    """``callback(tensor, name)``, raising BendingError if it fails or changes the shape."""
    try:
        out = callback(tensor, name)
    except BendingError as exc:
        raise BendingError(f"{kind} {name!r}: {exc}") from exc
    except Exception as exc:
        raise BendingError(f"{callback!r} fails on {kind} {name!r} of shape {tuple(tensor.shape)}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.shape != tensor.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BendingError(f"{callback!r} changes {kind} {name!r} from shape {tuple(tensor.shape)} to {got}")
    return out


def fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as exc:
        raise BendingError(f"{pattern!r} is no known name and not a valid regular expression ({exc})") from exc
