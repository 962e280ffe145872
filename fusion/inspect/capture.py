"""Capture intermediate activations of any model by layer name: torch.fx first, forward hooks as fallback.

Shared by :mod:`fusion.inspect.bend` (inspection and activation bending), :mod:`fusion.inspect.stitch`
(cutting models into a front and a back) and :mod:`fusion.analysis.similarity` (representation
similarity streamed over batches).

Layer names are torch.fx node names (``layer1_0_conv1``, ``add_3``) or module names
(``layer1.0.conv1``, ``layer2``): a module name stands for the node that produces the module's output,
which for a container (a residual block, a ``Sequential``) is the output of its last operation. A name
that matches nothing exactly is read as a regular expression (``re.fullmatch``) over node names first,
then over module names.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..checks import describe_shapes, run_model
from ..errors import FusionError, TraceError

__all__ = [
    "ActivationCapture",
    "TracedModel",
    "copy_graph_module",
    "features_as_matrix",
    "finish_graph_module",
    "forward_hooks",
    "hook_activations",
    "probe_module",
    "recorders",
    "resolve_names",
    "trace_model",
    "truncate_graph",
    "try_trace",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 12


class _RecordingTracer(fx.Tracer):
    """A tracer that remembers which node produced the output of every module call."""

    def __init__(self) -> None:
        super().__init__()
        self.module_calls: dict[str, list[str]] = {}

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        try:
            name = self.path_of_module(m)
        except NameError:
            return out
        if name and isinstance(out, fx.Proxy):
            self.module_calls.setdefault(name, []).append(out.node.name)
        return out


class TracedModel:
    """A torch.fx trace of a model with a map from module names to the nodes computing their outputs.

    Attributes:
        graph_module: the traced model; it shares submodules and tensors with the model (no copy).
        module_nodes: module name -> name of the node holding the module's output, for modules called
            exactly once.
        repeated_modules: module name -> node names, for modules called more than once (such as a
            ReLU reused inside a residual block); such a name is ambiguous and must be given as a node.
    """

    def __init__(self, graph_module: fx.GraphModule, module_calls: dict[str, list[str]]) -> None:
        self.graph_module = graph_module
        self.module_nodes = {k: v[0] for k, v in module_calls.items() if len(set(v)) == 1}
        self.repeated_modules = {k: tuple(v) for k, v in module_calls.items() if len(set(v)) > 1}

    @property
    def graph(self) -> fx.Graph:
        """The traced graph."""
        return self.graph_module.graph

    @property
    def node_names(self) -> list[str]:
        """Names of every node except the output, in execution order."""
        return [n.name for n in self.graph.nodes if n.op != "output"]

    def node(self, name: str) -> fx.Node:
        """The node called ``name`` (a node name, not a module name)."""
        for node in self.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def resolve(self, patterns: str | Sequence[str], error: type[FusionError], argument: str = "layers") -> list[
        tuple[str, str]
    ]:
        """Resolve layer names or regular expressions to ``(key, node name)`` pairs (see module doc)."""
        requested = [patterns] if isinstance(patterns, str) else list(patterns)
        for name, nodes in self.repeated_modules.items():
            if name in requested:
                raise error(
                    f"{argument}: module {name!r} is called {len(nodes)} times in forward, so its output is "
                    f"ambiguous; name one of its nodes instead: {', '.join(nodes)}"
                )
        return resolve_names(patterns, self.node_names, self.module_nodes, error, argument)


def trace_model(model: nn.Module, method: str = "forward") -> TracedModel:
    """Trace ``model``'s ``method`` (``forward`` by default) with torch.fx, recording every module call's output node.

    The returned GraphModule's ``forward`` computes ``model.<method>``.

    Raises:
        TraceError: torch.fx cannot trace the method (data-dependent control flow, unsupported ops), or
            the model has no such method.
    """
    if not callable(getattr(type(model), method, None)):
        raise TraceError(f"{type(model).__name__} has no method {method!r} to trace")
    tracer = _RecordingTracer()
    tracer.traced_func_name = method
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
        where = type(model).__name__ + ("" if method == "forward" else f".{method}")
        raise TraceError(f"torch.fx cannot trace {where}: {type(exc).__name__}: {exc}") from exc
    graph_module = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    return TracedModel(graph_module, tracer.module_calls)


def try_trace(model: nn.Module, method: str = "forward") -> TracedModel | None:
    """:func:`trace_model`, or None (with a logged warning) when torch.fx cannot trace ``model``'s ``method``."""
    try:
        return trace_model(model, method)
    except TraceError as exc:
        logger.warning("%s; falling back to forward hooks on named modules (activation names are module names)", exc)
        return None


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def resolve_names(
    patterns: str | Sequence[str],
    names: Sequence[str],
    aliases: dict[str, str],
    error: type[FusionError],
    argument: str = "layers",
) -> list[tuple[str, str]]:
    """Resolve names or regular expressions against canonical ``names`` and their ``aliases``.

    Args:
        patterns: one name/pattern or several.
        names: the canonical names (fx node names, or module names without fx).
        aliases: alternative name -> canonical name (module name -> node name).
        error: the exception type to raise.
        argument: how to call ``patterns`` in messages.

    Returns:
        ``(key, canonical)`` pairs without repeats, in the order given: an exact name is its own key,
        regular-expression matches are keyed by the name they matched.

    Raises:
        error: a pattern matches nothing or is not a valid regular expression.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if len(patterns) == 0:
        raise error(f"{argument} is empty: name at least one layer")
    known = set(names)
    found: list[tuple[str, str]] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise error(f"{argument} must hold strings, got {type(pattern).__name__}")
        if pattern in known:
            found.append((pattern, pattern))
            continue
        if pattern in aliases:
            found.append((pattern, aliases[pattern]))
            continue
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise error(f"{argument}: {pattern!r} is no known name and not a valid regular expression ({exc})") from exc
        matches = [(n, n) for n in names if regex.fullmatch(n)]
        if not matches:
            matches = [(a, c) for a, c in aliases.items() if regex.fullmatch(a)]
        if not matches:
            known_aliases = f"; module names: {_listing(list(aliases))}" if aliases else ""
            raise error(
                f"{argument}: no layer named or matching {pattern!r}; known names: {_listing(list(names))}{known_aliases}"
            )
        found.extend(matches)
    unique: dict[str, tuple[str, str]] = {}
    for key, canonical in found:
        unique.setdefault(key, (key, canonical))
    return list(unique.values())


def _copy_graph(graph: fx.Graph) -> tuple[fx.Graph, Any]:
    """A copy of ``graph`` (same node names) without its output node; returns the copied output value."""
    new = fx.Graph()
    value = new.graph_copy(graph, {})
    return new, value


def finish_graph_module(root: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """A GraphModule of ``graph`` over ``root``'s submodules, without dead nodes or unused submodules."""
    module = fx.GraphModule(root, graph, class_name=class_name)
    module.graph.eliminate_dead_code()
    module.graph.lint()
    module.delete_all_unused_submodules()
    module.recompile()
    return module


def copy_graph_module(graph_module: fx.GraphModule, class_name: str | None = None) -> fx.GraphModule:
    """A GraphModule with a copy of ``graph_module``'s graph (same node names) sharing its submodules.

    The copy's graph can be rewritten (nodes inserted, submodules added) without affecting the original.
    """
    graph, value = _copy_graph(graph_module.graph)
    graph.output(value)
    return fx.GraphModule(graph_module, graph, class_name=class_name or type(graph_module).__name__)


def truncate_graph(graph_module: fx.GraphModule, node_name: str) -> fx.GraphModule:
    """A GraphModule computing ``graph_module`` only up to ``node_name`` and returning that node's value.

    Nodes not needed for it are removed; submodules are shared with ``graph_module``, not copied.
    """
    graph, _ = _copy_graph(graph_module.graph)
    by_name = {n.name: n for n in graph.nodes}
    graph.output(by_name[node_name])
    return finish_graph_module(graph_module, graph, f"{type(graph_module).__name__}Front")


def probe_module(graph_module: fx.GraphModule, node_names: Sequence[str]) -> fx.GraphModule:
    """A GraphModule returning a tuple with a copy of each named node's value, computing nothing more.

    Each value is cloned right where it is computed, so later in-place operations (``ReLU(inplace=True)``)
    cannot alter what is returned.
    """
    graph, _ = _copy_graph(graph_module.graph)
    by_name = {n.name: n for n in graph.nodes}
    outputs = []
    for name in node_names:
        node = by_name[name]
        with graph.inserting_after(node):
            outputs.append(graph.call_function(_detached_clone, (node,)))
    graph.output(tuple(outputs))
    return finish_graph_module(graph_module, graph, f"{type(graph_module).__name__}Probe")


def _detached_clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


@contextlib.contextmanager
def forward_hooks(model: nn.Module, hooks: dict[str, Callable[[Any], Any]]) -> Iterator[None]:
    """Register ``hook(output)`` as a forward hook on each named module of ``model`` for the block.

    A hook returning a value other than None replaces the module's output. Hooks are removed on exit,
    even on exceptions, so the model is left as it was.
    """
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, hook in hooks.items():
            handles.append(modules[name].register_forward_hook(lambda _m, _i, out, _hook=hook: _hook(out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def recorders(names: Sequence[str], into: dict[str, Any]) -> dict[str, Callable[[Any], None]]:
    """Forward-hook functions storing a detached copy of each named module's output in ``into``."""

    def recorder(name: str) -> Callable[[Any], None]:
        def record(output: Any) -> None:
            into[name] = _detached_clone(output)

        return record

    return {name: recorder(name) for name in names}


def hook_activations(model: nn.Module, inputs: Any, module_names: Sequence[str], argument: str = "inputs") -> dict[
    str, Any
]:
    """Run ``model`` on ``inputs`` and return the (cloned) output of each named module via forward hooks.

    A module called several times keeps its last output.
    """
    recorded: dict[str, Any] = {}
    with forward_hooks(model, recorders(module_names, recorded)):
        run_model(model, inputs, argument)
    return recorded


class ActivationCapture:
    """Callable returning a model's activations at named layers for a batch of inputs.

    With torch.fx (the default) the model is traced once and only the part of the graph needed for the
    requested layers is run; without (``use_fx=False`` or a model fx cannot trace) forward hooks are
    placed on the named modules for the duration of each call. The model is never modified.

    Args:
        model: any nn.Module.
        layers: layer names or regular expressions (see the module docstring).
        error: the exception type raised for unknown names.
        use_fx: trace with torch.fx; when False or when tracing fails, use forward hooks.
        argument: how to call ``layers`` in messages.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        error: type[FusionError] = FusionError,
        use_fx: bool = True,
        argument: str = "layers",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model is a {type(model).__name__}, not an nn.Module")
        self.model = model
        self.traced = try_trace(model) if use_fx else None
        if self.traced is not None:
            self.pairs = self.traced.resolve(layers, error, argument)
            self._probe: nn.Module | None = probe_module(self.traced.graph_module, [c for _, c in self.pairs])
        else:
            module_names = [n for n, _ in model.named_modules() if n]
            self.pairs = resolve_names(layers, module_names, {}, error, argument)
            self._probe = None

    @property
    def names(self) -> list[str]:
        """The keys of the returned dictionaries, in order."""
        return [key for key, _ in self.pairs]

    def __call__(self, inputs: Any, argument: str = "inputs") -> dict[str, Any]:
        """Activations for ``inputs`` (a tensor, tuple of args or dict of kwargs) keyed by :attr:`names`."""
        with torch.no_grad():
            if self._probe is not None:
                values = run_model(self._probe, inputs, argument)
                return {key: value for (key, _), value in zip(self.pairs, values)}
            recorded = hook_activations(self.model, inputs, [c for _, c in self.pairs], argument)
        missing = [c for _, c in self.pairs if c not in recorded]
        if missing:
            raise FusionError(f"module(s) {', '.join(missing)} did not run in forward on {argument}")
        return {key: recorded[c] for key, c in self.pairs}


def features_as_matrix(features: torch.Tensor, flatten: str = "spatial", channel_dim: int = 1) -> torch.Tensor:
    """Reshape activations into a ``(samples, features)`` matrix.

    Args:
        features: ``(N, C)`` vectors or ``(N, C, *spatial)`` maps (channels at ``channel_dim``).
        flatten: ``"spatial"`` treats every spatial position as a sample (``(N*H*W, C)``);
            ``"full"`` keeps one sample per input (``(N, C*H*W)``).
        channel_dim: where the channels are in maps (1 for conv maps, -1 for ``(N, L, C)`` tokens).

    Returns:
        A 2-D tensor.
    """
    if not isinstance(features, torch.Tensor):
        raise FusionError(f"expected a tensor activation, got {type(features).__name__}")
    if features.dim() < 2:
        raise FusionError(f"expected activations with a batch and a feature dimension, got shape {describe_shapes(features)}")
    if flatten not in ("spatial", "full"):
        raise FusionError(f"flatten must be 'spatial' or 'full', got {flatten!r}")
    if features.dim() == 2:
        return features
    if flatten == "full":
        return features.reshape(features.shape[0], -1)
    moved = torch.movedim(features, channel_dim, -1)
    return moved.reshape(-1, moved.shape[-1])
