"""Building torch-pruning's dependency graph for a model, and naming its tensors."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from .._lazy import tp
from ..checks import describe_shapes, eval_mode, main_output, run_model
from ..errors import PermutationError, TraceError
from ..guard import memory_guard
from .hf_layers import customized_pruners


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


def _build_graph(work: nn.Module, example_inputs: Any, unwrapped: Any, deadline: float | None = None,
                 cut_outputs: Collection[str] = (), cut_inputs: Collection[str] = ()) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``work``, traced on its main output under the memory and
    time guard.

    Hooks that torch-pruning leaves on the model when its trace is interrupted are removed.
    ``cut_outputs`` (attention projections) and ``cut_inputs`` (output projections) name modules
    whose outputs / inputs are head dimensions, handled by :mod:`fusion.spec.heads`: the graph is
    cut there (their outputs become extra graph outputs, their inputs are detached), so it never
    walks the attention internals (softmax, rotary embeddings, caches). Frozen parameters are
    traced too (Whisper's sinusoidal positions).
    """
    modules = dict(work.named_modules())
    extra: list[torch.Tensor] = []

    def forward(model: nn.Module, inputs: Any) -> Any:
        # registered after torch-pruning's own hooks, so those record the uncut outputs
        handles = [modules[n].register_forward_hook(_cut_output(extra)) for n in cut_outputs]
        handles += [modules[n].register_forward_pre_hook(_cut_input) for n in cut_inputs]
        try:
            return run_model(model, inputs)
        finally:
            for handle in handles:
                handle.remove()

    def outputs(out: Any) -> list[torch.Tensor]:
        try:
            return [main_output(out), *extra]
        except TraceError as exc:
            raise TraceError(f"cannot trace {type(work).__name__}: {exc}") from exc

    frozen = [p for p in work.parameters() if not p.requires_grad]
    hooks = {m: set(m._forward_hooks) for m in work.modules()}
    what = f"tracing {type(work).__name__} (torch-pruning build_dependency)"
    try:
        with warnings.catch_warnings(), torch.enable_grad(), memory_guard(what, deadline=deadline):
            warnings.simplefilter("ignore")
            for p in frozen:
                p.requires_grad_(True)
            # traced on the main output only (logits / last hidden state): caches and auxiliary
            # outputs of ModelOutputs are not the model's output units
            return tp.DependencyGraph().build_dependency(
                work, example_inputs, forward_fn=forward, output_transform=outputs,
                verbose=False, unwrapped_parameters=unwrapped, customized_pruners=customized_pruners(work),
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
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _cut_output(extra: list[torch.Tensor]):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            extra.append(output)
            return output.detach()
        return None
    return hook


def _cut_input(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].detach(), *args[1:])
    return None


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
