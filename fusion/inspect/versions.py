"""Weight versions of an :class:`~fusion.inspect.bend.Inspector`: store, switch, interpolate.

**Versions** are named sets of weights. The *current weights* are the active version plus the *live*
weight bends (those added by :meth:`Inspector.bend` since the last :meth:`~Inspector.reset`,
:meth:`~Inspector.write` or version switch):

* ``write(name)`` stores the current (bent) weights as version ``name`` and makes it the active
  version; the live weight bends are now part of the snapshot, so they are cleared (they are not
  applied a second time). Activation bends are not weights: they stay live.
* ``set_version(name)`` (or ``inspector.version = name``; ``None`` means the original weights) makes
  ``name`` the active version and clears the live weight bends; ``keep_bends=True`` applies them on top
  of the new version instead. Used as a context manager, the previous version and bends come back on exit.
* ``interpolate(...)`` runs a weighted sum of versions inside a ``with`` block, with the same
  ``keep_bends`` rule.
* ``reset()`` clears every bend and returns to the original weights; stored versions are kept.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Self

import torch
from torch import nn

from ..errors import BendingError
from .tables import short_list

__all__ = ["ORIGINAL", "VersionsMixin"]

#: Name of the version holding the wrapped model's own weights.
ORIGINAL = "original"


class _Restore:
    """Returned by :meth:`Inspector.set_version`: the change is immediate; ``with`` undoes it on exit."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo = undo

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._undo()



class VersionsMixin:
    """Version management of :class:`~fusion.inspect.bend.Inspector` (see the module docstring).

    Relies on the inspector's ``module``, ``_versions``, ``_active``, ``_version``, ``_bends``,
    ``_original_state()``, ``bended_state_dict()`` and ``_refresh()``.
    """

    @property
    def versions(self) -> list[str]:
        """Names of the stored versions, ``"original"`` first."""
        return [ORIGINAL, *self._versions]

    @property
    def version(self) -> str | None:
        """The active version's name (None while interpolating). Assigning switches version (None: original)."""
        return self._version

    @version.setter
    def version(self, name: str | None) -> None:
        self.set_version(ORIGINAL if name is None else name)

    def _check_version_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise BendingError(f"a version name must be a non-empty string, got {name!r}")
        if name == ORIGINAL:
            raise BendingError(f"{ORIGINAL!r} is reserved for the wrapped model's own weights")

    def _snapshot_of(self, source: nn.Module | Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if source is None:
            return self.bended_state_dict()
        state = source.state_dict() if isinstance(source, nn.Module) else source
        if not isinstance(state, Mapping):
            raise BendingError(f"a version is taken from an nn.Module or a state dict, got {type(source).__name__}")
        reference = self.module.state_dict()
        for key, value in reference.items():
            if key not in state:
                raise BendingError(f"the new version lacks {key!r}, which the wrapped model has")
            if tuple(state[key].shape) != tuple(value.shape):
                raise BendingError(
                    f"shape mismatch for {key!r}: {tuple(state[key].shape)} in the new version, {tuple(value.shape)} "
                    "in the wrapped model"
                )
        extra = [k for k in state if k not in reference]
        if extra:
            raise BendingError(f"the new version has entries the wrapped model lacks: {short_list(extra)}")
        return {k: state[k].detach().clone().to(device=v.device, dtype=v.dtype) for k, v in reference.items()}

    def create_version(self, name: str, source: nn.Module | Mapping[str, torch.Tensor] | None = None) -> Self:
        """Store a new version: a snapshot of the current (bent) weights, or of ``source``'s weights.

        The active version and the live bends do not change (use :meth:`write` to store and switch).

        Raises:
            BendingError: the name exists (use :meth:`write` to overwrite) or ``source`` has another
                state-dict layout.
        """
        self._check_version_name(name)
        if name in self._versions:
            raise BendingError(f"version {name!r} already exists; use write({name!r}) to overwrite it")
        self._versions[name] = self._snapshot_of(source)
        return self

    def write(self, name: str) -> Self:
        """Store the current (bent) weights as version ``name`` (creating or overwriting it) and switch to it.

        The live weight bends are baked into the snapshot and cleared, so they apply once; activation
        bends stay live (they are not weights).
        """
        self._check_version_name(name)
        snapshot = self._snapshot_of(None)
        self._versions[name] = snapshot
        self._bends = [(cb, (), a) for cb, _, a in self._bends if a]
        self._active, self._version = dict(snapshot), name
        self._refresh()
        return self

    def _require_version(self, name: str) -> dict[str, torch.Tensor]:
        if name == ORIGINAL:
            return self._original_state()
        if name not in self._versions:
            raise BendingError(f"unknown version {name!r}; known versions: {', '.join(self.versions)}")
        return self._versions[name]

    def _activate(self, weights: dict[str, torch.Tensor] | None, name: str | None, keep_bends: bool) -> Callable[[], None]:
        previous = (self._active, self._version, list(self._bends))
        self._active, self._version = weights, name
        if not keep_bends:
            self._bends = [(cb, (), a) for cb, _, a in self._bends if a]
        try:
            self._refresh()
        except BendingError:
            self._active, self._version, self._bends = previous
            self._refresh()
            raise

        def undo() -> None:
            self._active, self._version, self._bends = previous
            self._refresh()

        return undo

    def set_version(self, name: str | None = ORIGINAL, keep_bends: bool = False) -> _Restore:
        """Make version ``name`` (None: the original weights) the active weights.

        The change takes effect at once; used as ``with inspector.set_version(name):`` it is undone on exit.

        Args:
            name: a stored version, or ``"original"``/None.
            keep_bends: apply the live weight bends on top of the new version; by default they are cleared
                (a version already holds the bends written into it).
        """
        name = ORIGINAL if name is None else name
        weights = self._require_version(name)
        return _Restore(self._activate(None if name == ORIGINAL else dict(weights), name, keep_bends))

    @contextlib.contextmanager
    def interpolate(
        self, *default: float | Mapping[str, float], keep_bends: bool = False, **weights: float
    ) -> Iterator[Self]:
        """Within the block, weights are ``sum_i c_i * version_i``.

        Call forms: ``interpolate({"a": 0.3, "b": 0.7})``, ``interpolate(a=0.3, b=0.7)``, and
        torchbend's ``interpolate(0.5, bended=0.5)`` where the positional number weighs the original
        weights. Non-floating entries (such as BatchNorm's ``num_batches_tracked``) come from the
        version with the largest coefficient. Live weight bends are cleared inside the block unless
        ``keep_bends``; everything is restored on exit, also after an exception.
        """
        coefficients: dict[str, float] = {}
        if len(default) > 1:
            raise BendingError(f"interpolate takes at most one positional argument, got {len(default)}")
        if default and isinstance(default[0], Mapping):
            coefficients.update(default[0])
        elif default:
            coefficients[ORIGINAL] = default[0]
        for name, c in weights.items():
            if name in coefficients:
                raise BendingError(f"coefficient of version {name!r} given twice")
            coefficients[name] = c
        if not coefficients:
            raise BendingError("interpolate needs coefficients, e.g. interpolate({'a': 0.3, 'b': 0.7}) or interpolate(a=0.3)")
        for name, c in coefficients.items():
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
                raise BendingError(f"coefficient of version {name!r} must be a finite number, got {c!r}")
        versions = {name: self._require_version(name) for name in coefficients}
        reference = self.module.state_dict()
        leader = max(coefficients, key=lambda n: coefficients[n])
        mixed = {}
        with torch.no_grad():
            for key, ref in reference.items():
                if ref.is_floating_point():
                    mixed[key] = sum(c * versions[n][key].to(ref.device) for n, c in coefficients.items())
                else:
                    mixed[key] = versions[leader][key]
        undo = self._activate(mixed, None, keep_bends)
        try:
            yield self
        finally:
            undo()


