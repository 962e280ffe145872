"""BendingConfig: a set of bends ``(callback, names...)`` as data (JSON, ``+``, equality, binding to a model)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..analysis.io import write_text
from ..errors import BendingError
from .callbacks import BendingCallback, as_callback, callback_from_dict

if TYPE_CHECKING:
    from .bend import Inspector

__all__ = ["BendingConfig", "Entry"]

_CONFIG_FORMAT = "fusion.bending_config/1"

Entry = tuple[BendingCallback, tuple[str, ...]]


class BendingConfig:
    """An ordered list of bends ``(callback, names...)``, usable as data.

    Names are weight/activation names or regular expressions until the config is bound to a model
    (:meth:`bind`), which resolves them to concrete names. Configs add up with ``+``, compare equal
    when their entries are equal, and round-trip through JSON (:meth:`to_json`, :meth:`save`, :meth:`load`)
    when all callbacks are registered (see :func:`fusion.inspect.callbacks.register_bending_callback`).

    Example:
        ``BendingConfig((Mask(0.3, dim=0), r"layer1\\..*conv\\d\\.weight"), (Scale(2.0), "layer2"))``
    """

    def __init__(self, *bends: tuple[Any, ...], bound_to: str | None = None) -> None:
        entries: list[Entry] = []
        for item in bends:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise BendingError(f"each bend must be a tuple (callback, name, ...), got {item!r}")
            names: list[str] = []
            for name in item[1:]:
                names.extend([name] if isinstance(name, str) else list(name))
            if not names or not all(isinstance(n, str) for n in names):
                raise BendingError(f"bend of {item[0]!r} needs one or more string names, got {list(item[1:])!r}")
            entries.append((as_callback(item[0]), tuple(names)))
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.bound_to = bound_to

    def __add__(self, other: BendingConfig) -> BendingConfig:
        if not isinstance(other, BendingConfig):
            return NotImplemented
        bound = self.bound_to if self.bound_to == other.bound_to else None
        return BendingConfig(*self.entries, *other.entries, bound_to=bound)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BendingConfig) and self.entries == other.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __repr__(self) -> str:
        head = f"BendingConfig(bound to {self.bound_to}" if self.bound_to else "BendingConfig("
        body = "".join(f"\n    {cb!r}: {list(names)}" for cb, names in self.entries)
        return f"{head}{body}\n)"

    def callbacks_for(self, name: str) -> list[BendingCallback]:
        """The callbacks this config applies to ``name`` (exact names; bind the config first for regexes)."""
        return [cb for cb, names in self.entries if name in names]

    #: torchbend's name for :meth:`callbacks_for`.
    op_from_key = callbacks_for

    def bind(self, target: Inspector | nn.Module) -> BendingConfig:
        """Resolve every name/regex against ``target`` (an Inspector or a model), in place; returns self.

        Binding changes this config (as in torchbend, ``config.bind(bended)`` is used for its effect):
        afterwards its names are concrete weight/activation names and it compares equal to
        ``bended.bending_config()`` after ``bended.bend(config)``. Nothing changes when a name fails.

        Raises:
            BendingError: a name matches no weight or activation of ``target``.
        """
        from .bend import Inspector

        inspector = target if isinstance(target, Inspector) else Inspector(target)
        entries = []
        for callback, patterns in self.entries:
            weights, activations = inspector.resolve_targets(patterns)
            entries.append((callback, tuple(weights + activations)))
        self.entries, self.bound_to = tuple(entries), type(inspector.module).__name__
        return self

    def to_json(self) -> str:
        """JSON text describing the config (raises BendingError for unserialisable callbacks)."""
        bends = [{"callback": cb.to_dict(), "names": list(names)} for cb, names in self.entries]
        return json.dumps({"format": _CONFIG_FORMAT, "bound_to": self.bound_to, "bends": bends}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> BendingConfig:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BendingError(f"bending config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != _CONFIG_FORMAT:
            raise BendingError(f"not a bending config: expected format {_CONFIG_FORMAT!r}")
        try:
            entries = [(callback_from_dict(b["callback"]), *b["names"]) for b in data["bends"]]
        except (KeyError, TypeError) as exc:
            raise BendingError(f"malformed bending config entry: {exc!r}") from exc
        return cls(*entries, bound_to=data.get("bound_to"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (temporary file + rename); returns the path."""
        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, module: Inspector | nn.Module | None = None) -> BendingConfig:
        """Read a config written by :meth:`save`, binding it to ``module`` when given."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise BendingError(f"cannot read bending config {str(path)!r}: {exc}") from exc
        config = cls.from_json(text)
        return config.bind(module) if module is not None else config
