"""Building torch-pruning's dependency graph for a model, and naming its tensors."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._lazy import tp
from ..checks import describe_shapes, eval_mode, run_model
from ..errors import PermutationError, TraceError
from ..guard import memory_guard


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Map every state-dict key to the first key that shares its tensor (tied weights)."""
    first: dict[int, str] = {}
    canonical = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        canonical[key] = first.setdefault(id(tensor), key)
    return canonical


def _resolve_ignored(model: nn.Module, ignored_layers: Sequence[str | nn.Module] | None) -> list[nn.Module]:
    modules = dict(model.named_modules())
    resolved = []
    for layer in ignored_layers or ():
        if isinstance(layer, str):
            if layer not in modules:
                raise PermutationError(f"ignored_layers names {layer!r}, which is not a module of the model")
            resolved.append(modules[layer])
        elif isinstance(layer, nn.Module):
            resolved.append(layer)
        else:
            raise TypeError(f"ignored_layers entries must be module names or modules, got {type(layer).__name__}")
    return resolved


def _build_graph(work: nn.Module, example_inputs: Any, unwrapped: Any, deadline: float | None = None) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``work``, traced under the memory and time guard.

    Hooks that torch-pruning leaves on the model when its trace is interrupted are removed.
    """
    hooks = {m: set(m._forward_hooks) for m in work.modules()}
    what = f"tracing {type(work).__name__} (torch-pruning build_dependency)"
    try:
        with warnings.catch_warnings(), torch.enable_grad(), memory_guard(what, deadline=deadline):
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(
                work, example_inputs, verbose=False, unwrapped_parameters=unwrapped
            )
    except TraceError:
        _remove_new_hooks(hooks)
        raise
    except Exception as exc:  # torch-pruning raises plain exceptions of many kinds
        _remove_new_hooks(hooks)
        with torch.no_grad(), eval_mode(work):
            run_model(work, example_inputs)  # raises ExampleInputError if the inputs are at fault
        raise TraceError(
            f"torch-pruning could not trace {type(work).__name__} on example_inputs of shape "
            f"{describe_shapes(example_inputs)}: {type(exc).__name__}: {exc}"
        ) from exc


def _remove_new_hooks(before: dict[nn.Module, set[int]]) -> None:
    for module, keys in before.items():
        for key in set(module._forward_hooks) - keys:
            del module._forward_hooks[key]


def _all_groups(graph: tp.DependencyGraph, model: nn.Module, deadline: float | None = None) -> list[Any]:
    """Every torch-pruning group rooted at a module, under the memory and time guard."""
    what = f"grouping the channels of {type(model).__name__} (torch-pruning get_all_groups)"
    try:
        with memory_guard(what, deadline=deadline):
            return list(graph.get_all_groups(root_module_types=(nn.Module,)))
    except TraceError:
        raise
    except Exception as exc:
        raise TraceError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
