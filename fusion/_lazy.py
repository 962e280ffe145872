"""Start-up time: public names loaded on first use, and torch-pruning without timm.

``import fusion`` (and so every ``fusion`` command, ``fusion --help`` included) would otherwise
import torch, torch-pruning, POT, scikit-learn (through POT), matplotlib, and timm, torchvision and
``torch._dynamo`` (through torch-pruning) before doing anything: seconds. Instead:

* packages list their public names by submodule, and :func:`lazy_exports` gives them a module
  ``__getattr__`` (PEP 562) that imports the submodule on first access;
* ``tp`` (``from fusion._lazy import tp``) is torch-pruning, imported with ``timm`` hidden when timm is installed but not yet
  imported: ``torch_pruning.utils.op_counter`` imports timm only to count the FLOPs of timm
  attention modules, which ``fusion`` never does. timm itself stays importable afterwards.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]  # and ``tp``, loaded by __getattr__


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]], submodules: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, loading its public names on first access.

    Args:
        package: the package's ``__name__``.
        exports: relative module (``".align"``) -> the public names it defines.
        submodules: submodules that are public names themselves (``"analysis"``).

    A loaded name is cached in the package's namespace, so each module is imported once. The
    package's class is switched to one that keeps a function from being replaced by the submodule
    of the same name, which the import system binds on the package when it imports that submodule
    (``fusion.permute`` stays the function when ``fusion.permute``, the module, is imported).
    """
    where = {name: module for module, names in exports.items() for name in names}
    modules = set(submodules)

    def __getattr__(name: str) -> Any:
        if name in modules:
            value = importlib.import_module(f".{name}", package)
        elif name in where:
            value = getattr(importlib.import_module(where[name], package), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        object.__setattr__(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where, *modules})

    class _LazyPackage(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            if isinstance(value, types.ModuleType) and name in where:
                return  # a submodule named like a public function: reachable through sys.modules only
            super().__setattr__(name, value)

    sys.modules[package].__class__ = _LazyPackage
    return __getattr__, __dir__


def _import_torch_pruning() -> Any:
    """torch-pruning, with timm hidden during its import when timm is installed but not imported yet."""
    hide = "timm" not in sys.modules and "torch_pruning" not in sys.modules
    if hide:
        sys.modules["timm"] = None  # type: ignore[assignment]  # makes ``import timm`` raise ImportError
    try:
        import torch_pruning
    finally:
        if hide and sys.modules.get("timm", 0) is None:
            del sys.modules["timm"]
    return torch_pruning



def __getattr__(name: str) -> Any:
    if name == "tp":  # ``from fusion._lazy import tp``: imported on first use, not with this module
        return _import_torch_pruning()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
