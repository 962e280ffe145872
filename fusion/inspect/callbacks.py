"""Bending callbacks: deterministic, serialisable transformations applied to weights or activations.

A callback maps a tensor to a tensor of the same shape (masking, scaling, permuting, adding noise, or a
user function). Randomised callbacks carry a seed; the random draw is a function of that seed, the
tensor's shape and the name of the weight/activation it is applied to, so a bend is reproducible from
its JSON description (see :class:`fusion.inspect.bend.BendingConfig`) and two layers of equal shape
bent by one callback get different masks. Inspired by the bending operations of *torchbend*
(Chemla--Romeu-Santos & Esling, 2024).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..checks import describe_shapes
from ..errors import BendingError

__all__ = [
    "BendingCallback",
    "Lambda",
    "Mask",
    "Noise",
    "Permute",
    "Scale",
    "as_callback",
    "callback_from_dict",
    "register_bending_callback",
]

_REGISTRY: dict[str, type[BendingCallback]] = {}


def register_bending_callback(cls: type[BendingCallback]) -> type[BendingCallback]:
    """Class decorator making a :class:`BendingCallback` dataclass loadable from JSON by its class name."""
    if not (isinstance(cls, type) and issubclass(cls, BendingCallback) and dataclasses.is_dataclass(cls)):
        raise BendingError(f"{cls!r} must be a dataclass subclass of BendingCallback to be registered")
    _REGISTRY[cls.__name__] = cls
    return cls


class BendingCallback:
    """Base class: a frozen dataclass whose ``__call__(tensor, name)`` returns the bent tensor.

    Subclasses implement :meth:`apply`; the result must have the input's shape. Register subclasses
    with :func:`register_bending_callback` so that configurations holding them can be saved as JSON.
    """

    serialisable: ClassVar[bool] = True

    def apply(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Return the bent version of ``tensor`` (the weight or activation called ``name``)."""
        raise NotImplementedError

    def __call__(self, tensor: torch.Tensor, name: str = "") -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise BendingError(f"{self!r} can only bend tensors, but {name or 'its target'} is a {type(tensor).__name__}")
        return self.apply(tensor, name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: ``{"type": class name, **fields}``."""
        if not self.serialisable or type(self).__name__ not in _REGISTRY:
            raise BendingError(
                f"{self!r} cannot be serialised: subclass BendingCallback as a dataclass and decorate it "
                "with register_bending_callback"
            )
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"type": type(self).__name__, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def callback_from_dict(description: dict[str, Any]) -> BendingCallback:
    """Rebuild a registered callback from :meth:`BendingCallback.to_dict` output."""
    if not isinstance(description, dict) or "type" not in description:
        raise BendingError(f"a callback description must be a dict with a 'type' key, got {description!r}")
    kind = description["type"]
    if kind not in _REGISTRY:
        raise BendingError(f"unknown bending callback type {kind!r}; registered: {', '.join(sorted(_REGISTRY))}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in description.items() if k != "type"}
    try:
        return _REGISTRY[kind](**fields)
    except TypeError as exc:
        raise BendingError(f"bad fields for bending callback {kind}: {exc}") from exc


def _draw_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _generator(seed: int, name: str, shape: tuple[int, ...]) -> torch.Generator:
    """A CPU generator determined by the seed, the target's name and shape (same draw on every device)."""
    key = zlib.crc32(f"{name}|{tuple(shape)}".encode())
    return torch.Generator().manual_seed((seed * 1_000_003 + key) % (2**63 - 1))


def _check_dim(tensor: torch.Tensor, dim: int, name: str, owner: BendingCallback) -> int:
    if not -tensor.dim() <= dim < tensor.dim():
        raise BendingError(
            f"{owner!r}: dim {dim} is out of range for {name or 'a tensor'} of shape {describe_shapes(tensor)}"
        )
    return dim % tensor.dim()


def _set_seed(obj: Any) -> None:
    if obj.seed is None:
        object.__setattr__(obj, "seed", _draw_seed())
    if not isinstance(obj.seed, int):
        raise BendingError(f"{type(obj).__name__}: seed must be an int or None, got {obj.seed!r}")


@register_bending_callback
@dataclass(frozen=True)
class Mask(BendingCallback):
    """Zero each entry (or, with ``dim``, each whole slice along ``dim``) with probability ``prob``.

    Args:
        prob: probability that an entry/slice is zeroed, in [0, 1]. Survivors are not rescaled.
        dim: mask whole channels along this dimension (e.g. ``dim=0`` for a conv weight's output
            channels, ``dim=1`` for activation channels); None masks entries independently.
        seed: random seed (drawn from torch's generator when None, then stored).
    """

    prob: float
    dim: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prob, bool) or not isinstance(self.prob, (int, float)) or not 0.0 <= self.prob <= 1.0:
            raise BendingError(f"Mask: prob must be a probability in [0, 1], got {self.prob!r}")
        _set_seed(self)

    def apply(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        if self.dim is None:
            shape = tuple(tensor.shape)
        else:
            dim = _check_dim(tensor, self.dim, name, self)
            shape = tuple(tensor.shape[d] if d == dim else 1 for d in range(tensor.dim()))
        keep = torch.rand(shape, generator=_generator(self.seed, name, shape)) >= self.prob
        return tensor * keep.to(device=tensor.device, dtype=tensor.dtype)


@register_bending_callback
@dataclass(frozen=True)
class Scale(BendingCallback):
    """Multiply by a constant ``factor``."""

    factor: float

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)):
            raise BendingError(f"Scale: factor must be a number, got {self.factor!r}")

    def apply(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor * self.factor


@register_bending_callback
@dataclass(frozen=True)
class Permute(BendingCallback):
    """Reorder slices along ``dim``: output slice ``i`` is input slice ``order[i]``.

    Args:
        order: a permutation of ``range(size of dim)``.
        dim: the dimension to permute (0: output channels of a weight; 1: channels of an activation).
    """

    order: tuple[int, ...]
    dim: int = 0

    def __post_init__(self) -> None:
        order = tuple(int(i) for i in (self.order.tolist() if isinstance(self.order, torch.Tensor) else self.order))
        if sorted(order) != list(range(len(order))):
            raise BendingError(f"Permute: order must be a permutation of 0..{len(order) - 1}, got {list(order)}")
        object.__setattr__(self, "order", order)

    def apply(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        dim = _check_dim(tensor, self.dim, name, self)
        if tensor.shape[dim] != len(self.order):
            raise BendingError(
                f"Permute: order has {len(self.order)} entries but {name or 'the tensor'} has size "
                f"{tensor.shape[dim]} along dim {self.dim} (shape {describe_shapes(tensor)})"
            )
        return tensor.index_select(dim, torch.tensor(self.order, device=tensor.device))


@register_bending_callback
@dataclass(frozen=True)
class Noise(BendingCallback):
    """Add Gaussian noise with standard deviation ``std`` (a fixed draw per seed, name and shape)."""

    std: float
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.std, bool) or not isinstance(self.std, (int, float)) or not self.std >= 0:
            raise BendingError(f"Noise: std must be a non-negative number, got {self.std!r}")
        _set_seed(self)

    def apply(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        shape = tuple(tensor.shape)
        noise = torch.randn(shape, generator=_generator(self.seed, name, shape))
        return tensor + self.std * noise.to(device=tensor.device, dtype=tensor.dtype)


@dataclass(frozen=True)
class Lambda(BendingCallback):
    """A user function ``fn(tensor) -> tensor`` used as a callback (works, but cannot be saved as JSON)."""

    fn: Callable[[torch.Tensor], torch.Tensor]

    serialisable: ClassVar[bool] = False

    def apply(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        out = self.fn(tensor)
        if not isinstance(out, torch.Tensor):
            raise BendingError(f"{self!r} returned a {type(out).__name__} for {name or 'its input'}, not a tensor")
        return out

    def __repr__(self) -> str:
        return f"Lambda({getattr(self.fn, '__qualname__', repr(self.fn))})"


def as_callback(callback: BendingCallback | Callable[[torch.Tensor], torch.Tensor]) -> BendingCallback:
    """``callback`` itself, or a plain callable wrapped in :class:`Lambda`."""
    if isinstance(callback, BendingCallback):
        return callback
    if callable(callback):
        return Lambda(callback)
    raise BendingError(f"a bending callback must be a BendingCallback or a callable, got {type(callback).__name__}")
