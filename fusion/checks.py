"""Input validation shared by every public function: architectures, devices, finiteness, data.

Each check raises the matching :mod:`fusion.errors` type with a message naming the argument,
parameter or shape at fault, and never modifies what it checks.

Model I/O: ``example_inputs`` (and data batches) may be a tensor, a tuple/list of positional
inputs, or a mapping of keyword inputs (a ``dict`` or a tokenizer's ``BatchEncoding``);
:func:`split_inputs` turns any of them into ``(args, kwargs)``. A model's output may be a tensor,
a tuple, a mapping or a Hugging Face ``ModelOutput`` (possibly holding a cache); every comparison
reads :func:`main_output`, its one main tensor (``logits``, else the first floating tensor, which
is ``last_hidden_state`` for a base model).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import (
    ArchitectureMismatchError,
    DataError,
    DeviceMismatchError,
    EnsembleError,
    ExampleInputError,
    FusionError,
    NonFiniteWeightsError,
    TraceError,
)

__all__ = [
    "check_finite",
    "check_models",
    "check_same_architecture",
    "check_same_device",
    "check_weights",
    "eval_mode",
    "iter_batches",
    "main_output",
    "model_device",
    "model_dtype",
    "move_inputs",
    "run_model",
    "split_batch",
    "split_inputs",
]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without tensors)."""
    for tensor in _tensors(model):
        return tensor.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 if none)."""
    for tensor in _tensors(model):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _label(names: Sequence[str] | None, index: int) -> str:
    if names is not None and index < len(names):
        return names[index]
    return f"models[{index}]"


def check_same_architecture(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """Raise :class:`ArchitectureMismatchError` naming the first parameter/buffer that differs.

    Two models share an architecture here when their state dicts have the same keys in the
    same order with the same shapes.
    """
    reference = models[0].state_dict()
    for k in range(1, len(models)):
        other = models[k].state_dict()
        a, b = _label(names, 0), _label(names, k)
        for key in reference:
            if key not in other:
                raise ArchitectureMismatchError(f"{b} has no parameter or buffer {key!r}, which {a} has")
            if reference[key].shape != other[key].shape:
                raise ArchitectureMismatchError(
                    f"{key!r} has shape {tuple(reference[key].shape)} in {a} "
                    f"but {tuple(other[key].shape)} in {b}"
                )
        for key in other:
            if key not in reference:
                raise ArchitectureMismatchError(f"{a} has no parameter or buffer {key!r}, which {b} has")


def check_finite(model: nn.Module, name: str = "model") -> None:
    """Raise :class:`NonFiniteWeightsError` if any floating parameter or buffer holds NaN/inf."""
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeightsError(
                f"{name}: {key!r} (shape {tuple(tensor.shape)}) has {bad} non-finite value(s)"
            )


def check_same_device(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> torch.device:
    """Raise :class:`DeviceMismatchError` unless every model lives on one device with one dtype.

    Returns:
        The common device.
    """
    device, dtype = model_device(models[0]), model_dtype(models[0])
    for k, model in enumerate(models):
        for key, tensor in model.state_dict().items():
            if tensor.device != device:
                raise DeviceMismatchError(
                    f"{_label(names, k)}: {key!r} is on {tensor.device}, but {_label(names, 0)} is on "
                    f"{device}; move all models to one device first"
                )
            if tensor.is_floating_point() and tensor.dtype != dtype:
                raise DeviceMismatchError(
                    f"{_label(names, k)}: {key!r} has dtype {tensor.dtype}, but {_label(names, 0)} uses "
                    f"{dtype}; convert all models to one dtype first"
                )
    return device


def check_models(
    models: Sequence[nn.Module],
    names: Sequence[str] | None = None,
    min_count: int = 1,
    finite: bool = True,
) -> torch.device:
    """Run the usual checks on a list of models that must share an architecture and a device.

    Args:
        models: the models.
        names: how to call them in messages (default ``models[i]``).
        min_count: the least number of models accepted (raises :class:`EnsembleError`).
        finite: also check that weights are finite.

    Returns:
        The common device.
    """
    if isinstance(models, nn.Module):
        raise EnsembleError("expected a list of models, got a single nn.Module")
    models = list(models)
    if len(models) < min_count:
        raise EnsembleError(f"expected at least {min_count} model(s), got {len(models)}")
    for k, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_label(names, k)} is a {type(model).__name__}, not an nn.Module")
    check_same_architecture(models, names)
    device = check_same_device(models, names)
    if finite:
        for k, model in enumerate(models):
            check_finite(model, _label(names, k))
    return device


def move_inputs(inputs: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move a tensor, or tensors nested in tuples/lists/mappings, to ``device``.

    Mappings (``dict``, ``BatchEncoding``, any ``Mapping``) come back as plain ``dict``s; values
    that are not tensors (flags, ``None``) are kept as they are. With ``dtype``, floating tensors
    are also converted to it (integer ids and masks keep theirs).
    """
    if isinstance(inputs, torch.Tensor):
        if dtype is not None and inputs.is_floating_point():
            return inputs.to(device, dtype)
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: move_inputs(v, device, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(move_inputs(v, device, dtype) for v in inputs)
    return inputs


def split_inputs(inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for calling a model on ``inputs``.

    A mapping is keyword inputs, a tuple/list is positional inputs, anything else (a tensor) is
    the one positional input.
    """
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs), {}
    return (inputs,), {}


def run_model(model: Any, inputs: Any, argument: str = "example_inputs") -> Any:
    """Call ``model`` on ``inputs`` (a tensor, a tuple/list of positional args or a mapping of kwargs).

    Returns the model's raw output (see :func:`main_output` for the tensor to compare). Errors
    raised by the model's forward for shape/dtype/type reasons are re-raised as
    :class:`ExampleInputError` naming ``argument``, the input shapes and, for several positional
    inputs, the forward parameters they were bound to.
    """
    args, kwargs = split_inputs(inputs)
    try:
        return model(*args, **kwargs)
    except FusionError:
        raise  # a guard's time/memory stop, or fusion's own check inside the forward
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError, KeyError) as exc:
        raise ExampleInputError(
            f"the model rejected {argument} of shape {describe_shapes(inputs)}: {type(exc).__name__}: {exc}"
            f"{_positional_hint(model, args)}"
        ) from exc


def _positional_hint(model: Any, args: tuple) -> str:
    """Where several positional inputs landed, e.g. a mask bound to a model's ``past_key_values``."""
    if len(args) < 2:
        return ""
    try:
        params = list(inspect.signature(getattr(model, "forward", model)).parameters)
    except (TypeError, ValueError):
        return ""
    bound = ", ".join(f"{p}={describe_shapes(a)}" for p, a in zip(params, args))
    return (f" (positional inputs bind as forward({bound}); pass a dict of keyword tensors, "
            f"e.g. {{{params[0]!r}: ..., 'attention_mask': ...}}, to choose the parameters)")


def main_output(out: Any) -> torch.Tensor:
    """The one tensor of a model's output that comparisons read.

    A tensor is itself. A mapping (``dict``, Hugging Face ``ModelOutput``) gives ``logits``, else
    its first floating tensor that is not ``loss`` (``last_hidden_state`` for a base model,
    ``image_embeds`` for CLIP with a projection); a tuple or list gives its first floating tensor
    (searched depth first). Caches and other objects are skipped.

    Raises:
        TraceError: the output holds no floating tensor.
    """
    found = _main_output(out)
    if found is None:
        raise TraceError(f"the model's output ({describe_shapes(out)}) holds no floating-point tensor to compare")
    return found


_MAIN_KEYS = ("logits",)


def _main_output(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() or out.is_complex() else None
    if isinstance(out, Mapping):
        for key in _MAIN_KEYS:
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
        values = [v for k, v in out.items() if k != "loss"]
    elif isinstance(out, (list, tuple)):
        values = list(out)
    else:
        return None
    for value in values:
        found = _main_output(value)
        if found is not None:
            return found
    return None


def describe_shapes(inputs: Any) -> str:
    """A short human-readable description of the shapes of (nested) tensors."""
    if isinstance(inputs, torch.Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {describe_shapes(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (list, tuple)):
        return "(" + ", ".join(describe_shapes(v) for v in inputs) + ")"
    return type(inputs).__name__


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Split a data batch into ``(inputs, targets)``; targets is None for an unlabeled batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (list, tuple)) and len(batch) == 1:
        return batch[0], None
    if isinstance(batch, Mapping):
        return batch, None
    raise DataError(
        f"cannot read a batch of type {type(batch).__name__}: expected a tensor or an (inputs, targets) pair"
    )


def iter_batches(data: Any, argument: str = "data") -> Iterator[tuple[Any, Any]]:
    """Iterate ``(inputs, targets)`` over ``data``.

    ``data`` may be a DataLoader or any iterable of batches (tensors or ``(x, y)`` pairs), or a
    single tensor (one unlabeled batch). Raises :class:`DataError` if it yields nothing.
    """
    if data is None:
        raise DataError(f"{argument} is required here but was None")
    if isinstance(data, torch.Tensor):
        if data.numel() == 0:
            raise DataError(f"{argument} is an empty tensor")
        yield data, None
        return
    if not isinstance(data, Iterable):
        raise DataError(f"{argument} must be a DataLoader, an iterable of batches or a tensor, got {type(data).__name__}")
    empty = True
    for batch in data:
        empty = False
        yield split_batch(batch)
    if empty:
        raise DataError(f"{argument} yielded no batches")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` (and all submodules) in eval mode, restoring each module's own mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def caches_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Restore the contents of every dict attribute of every submodule on exit.

    Some modules cache tensors computed by an eval-mode forward in a dict (timm's LeViT and
    EfficientFormer ``attention_bias_cache``); a forward traced with autograd leaves non-leaf
    tensors there, which ``copy.deepcopy`` rejects. Code that only reads a model uses this to leave
    such caches as they were.
    """
    saved = [(value, dict(value)) for m in model.modules() for key, value in vars(m).items()
             if isinstance(value, dict) and not key.startswith("_")]
    try:
        yield model
    finally:
        for value, contents in saved:
            value.clear()
            value.update(contents)


WEIGHT_SUM_TOL = 1e-6


def check_weights(weights: Sequence[float] | None, count: int, allow_negative: bool = False) -> list[float]:
    """Validate combination weights of ``count`` members (uniform if None).

    Args:
        weights: one finite weight per member, summing to 1 within :data:`WEIGHT_SUM_TOL`.
        count: number of members.
        allow_negative: accept negative weights (affine combinations, e.g. extrapolation).

    Returns:
        The weights as floats.

    Raises:
        EnsembleError: wrong length, a non-finite or (unless allowed) negative weight, or a sum other than 1.
    """
    if count < 1:
        raise EnsembleError("expected at least 1 member, got 0")
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    values = [float(w) for w in weights]
    if len(values) != count:
        raise EnsembleError(f"got {len(values)} weights for {count} members; pass exactly one weight per member")
    for k, w in enumerate(values):
        if not math.isfinite(w):
            raise EnsembleError(f"weights[{k}] is {w}; weights must be finite")
        if w < 0 and not allow_negative:
            raise EnsembleError(f"weights[{k}] is {w}; weights must be non-negative")
    if abs(sum(values) - 1.0) > WEIGHT_SUM_TOL:
        raise EnsembleError(f"weights must sum to 1, but {values} sum to {sum(values)}")
    return values
