"""torch.fx graph-module surgery: cut a model at a layer (:func:`set_output`), wire models together (:func:`merge_graph_modules`).

These are the two operations model stitching is made of (:func:`fusion.stitch` is built on them), and
the ones nn-library's ``GraphModulePlus.set_output`` / ``new_from_merge`` provide, as pure functions:
they return new ``GraphModule`` objects that share submodules (and so tensors) with their inputs and
never modify them.

Layer names are torch.fx node names or module names (see :mod:`fusion.inspect.capture`).
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from torch import fx, nn

from ..errors import FusionError, TraceError
from .capture import TracedModel, finish_graph_module, trace_model, truncate_graph

__all__ = ["MERGED_FROM", "merge_graph_modules", "nodes_from", "set_output"]

#: ``node.meta`` key naming the model a node of a merged graph was copied from.
MERGED_FROM = "fusion_merged_from"


def _opaque(model: nn.Module) -> TracedModel:
    """A one-node graph calling ``model`` (as submodule ``layer``) on its required positional inputs."""
    parameters = inspect.signature(model.forward).parameters.values()
    names = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty] or ["x"]
    root = nn.Module()
    root.add_module("layer", model)
    graph = fx.Graph()
    graph.output(graph.call_module("layer", tuple(graph.placeholder(n) for n in names)))
    return TracedModel(fx.GraphModule(root, graph, class_name=type(model).__name__), {"layer": ["layer"]})


def _traced(model: nn.Module, argument: str, error: type[FusionError], opaque: bool = False) -> TracedModel:
    if not isinstance(model, nn.Module):
        raise error(f"{argument} is a {type(model).__name__}, not an nn.Module")
    if opaque:
        return _opaque(model)
    try:
        return trace_model(model)
    except TraceError as exc:
        raise error(f"{argument}: {exc}") from exc


def _node(traced: TracedModel, layer: str, argument: str, error: type[FusionError]) -> str:
    if not isinstance(layer, str):
        raise error(f"{argument} must be a layer name (str), got {type(layer).__name__}")
    if layer in traced.node_names:
        return layer
    pairs = traced.resolve(layer, error, argument)
    nodes = list(dict.fromkeys(c for _, c in pairs))
    if len(nodes) != 1:
        raise error(f"{argument}={layer!r} matches {len(nodes)} layers ({', '.join(nodes[:8])}); name exactly one")
    return nodes[0]


def set_output(graph_module: nn.Module, layer_name: str, *, error: type[FusionError] = FusionError) -> fx.GraphModule:
    """A GraphModule computing ``graph_module`` up to ``layer_name`` and returning that layer's output.

    Everything not needed for that output is dropped ("chop off the head"). ``graph_module`` may be
    any traceable nn.Module; it is not modified, and the result shares its submodules.

    Args:
        graph_module: a GraphModule or any model torch.fx can trace.
        layer_name: an fx node name (``"layer1_0_relu_1"``) or module name (``"layer2"``).
        error: the exception type for an unknown layer or an untraceable model.
    """
    traced = _traced(graph_module, "graph_module", error)
    return truncate_graph(traced.graph_module, _node(traced, layer_name, "layer_name", error))


def _split(reference: str, known: Mapping[str, TracedModel], argument: str, error: type[FusionError]) -> tuple[str, str | None]:
    """``"model"`` -> (model, None); ``"model.layer"`` -> (model, node name)."""
    if not isinstance(reference, str):
        raise error(f"{argument}: expected 'model' or 'model.layer', got {reference!r}")
    name, _, layer = reference.partition(".")
    if name not in known:
        raise error(f"{argument}: {reference!r} names no model; models: {', '.join(known)}")
    return name, (_node(known[name], layer, argument, error) if layer else None)


def merge_graph_modules(
    modules: Mapping[str, nn.Module],
    wiring: Mapping[str, str | Sequence[str]],
    output: str | None = None,
    *,
    opaque: Collection[str] = (),
    class_name: str = "MergedGraphModule",
    error: type[FusionError] = FusionError,
) -> fx.GraphModule:
    """Wire several models into one GraphModule (nn-library's ``new_from_merge``).

    Each model's graph is copied into a new graph; its submodules are registered under ``"<name>."``
    (shared, not copied). ``wiring`` says where values come from:

    * ``{"stitch": "a.layer2"}``: the inputs of model ``stitch`` are the output of ``layer2`` in ``a``
      (a list of sources for a model with several inputs);
    * ``{"b.layer2": "stitch"}``: inside ``b``, the value of ``layer2`` is replaced by ``stitch``'s output,
      so ``b`` continues from there (what comes before it in ``b`` is dropped when nothing else uses it).

    A source is ``"model"`` (its output) or ``"model.layer"`` (a node or module name inside it). Models
    whose inputs are not wired read the merged module's inputs (by position). Unused nodes and
    submodules are removed; every node records its model in ``node.meta[MERGED_FROM]``.

    Args:
        modules: name -> model (GraphModules or any traceable models; names without dots). Any order:
            models run in an order that respects the wiring.
        wiring: target -> source(s), as above.
        output: the model (or ``"model.layer"``) whose value the merged module returns; default: the
            last model in ``modules``.
        opaque: models inserted as one call instead of being traced (layers with Python control flow
            on their inputs, or whose inside does not matter); their only node is ``"<name>.layer"``.
        class_name: the class name of the result.
        error: the exception type for bad names, cycles and untraceable models.

    Returns:
        The merged GraphModule.
    """
    if not modules:
        raise error("merge_graph_modules needs at least one model")
    for name in modules:
        if not isinstance(name, str) or not name or "." in name:
            raise error(f"model names must be non-empty strings without dots, got {name!r}")
    unknown = [name for name in opaque if name not in modules]
    if unknown:
        raise error(f"opaque names unknown models: {', '.join(map(str, unknown))}")
    traced = {name: _traced(model, f"modules[{name!r}]", error, name in opaque) for name, model in modules.items()}
    inputs_of: dict[str, list[tuple[str, str | None]]] = {}
    replaced: dict[str, dict[str, tuple[str, str | None]]] = {name: {} for name in traced}
    for target, sources in wiring.items():
        model, node = _split(target, traced, "wiring target", error)
        refs = [sources] if isinstance(sources, str) else list(sources)
        parsed = [_split(s, traced, f"wiring source of {target!r}", error) for s in refs]
        if node is None:
            inputs_of[model] = parsed
        elif len(parsed) != 1:
            raise error(f"wiring: node {target!r} is replaced by exactly one source, got {len(parsed)}")
        else:
            replaced[model][node] = parsed[0]
    order = _order(traced, inputs_of, replaced, error)

    graph = fx.Graph()
    root = nn.Module()
    values: dict[str, dict[str, fx.Node]] = {}
    outputs: dict[str, Any] = {}
    merged_inputs: list[fx.Node] = []
    for name in order:
        source = traced[name].graph
        placeholders = [n for n in source.nodes if n.op == "placeholder"]
        seeded: dict[fx.Node, Any] = {}
        if name in inputs_of:
            if len(inputs_of[name]) != len(placeholders):
                raise error(
                    f"wiring: model {name!r} takes {len(placeholders)} input(s) "
                    f"({', '.join(str(p.target) for p in placeholders)}), got {len(inputs_of[name])} source(s)"
                )
            for placeholder, ref in zip(placeholders, inputs_of[name]):
                seeded[placeholder] = _value(ref, values, outputs)
        else:
            for k, placeholder in enumerate(placeholders):
                if k == len(merged_inputs):
                    merged_inputs.append(graph.placeholder(str(placeholder.target)))
                seeded[placeholder] = merged_inputs[k]
        by_name = {n.name: n for n in source.nodes}
        for node_name, ref in replaced[name].items():
            seeded[by_name[node_name]] = _value(ref, values, outputs)
        copied = dict(seeded)
        _copy_nodes(graph, source, copied, name, root, traced[name].graph_module)
        values[name] = {n.name: copied[n] for n in source.nodes if n.op != "output" and n in copied}
        outputs[name] = copied["__output__"]
    target = _split(output, traced, "output", error) if output is not None else (list(modules)[-1], None)
    graph.output(_value(target, values, outputs))
    return finish_graph_module(root, graph, class_name)


def _value(ref: tuple[str, str | None], values: dict[str, dict[str, fx.Node]], outputs: dict[str, Any]) -> Any:
    name, node = ref
    return outputs[name] if node is None else values[name][node]


def _copy_nodes(graph: fx.Graph, source: fx.Graph, copied: dict[Any, Any], name: str, root: nn.Module,
                owner: fx.GraphModule) -> None:
    """Copy ``source``'s nodes into ``graph`` with module targets prefixed by ``name``; ``copied["__output__"]``."""
    for node in source.nodes:
        if node in copied:
            continue
        if node.op == "output":
            copied["__output__"] = fx.node.map_arg(node.args[0], lambda n: copied[n])
            continue
        new = graph.node_copy(node, lambda n: copied[n])
        if node.op in ("call_module", "get_attr"):
            new.target = f"{name}.{node.target}"
            _register(root, new.target, owner.get_submodule(node.target) if node.op == "call_module"
                      else _attribute(owner, node.target))
        new.meta[MERGED_FROM] = name
        copied[node] = new


def _attribute(owner: nn.Module, target: str) -> Any:
    module_path, _, attr = target.rpartition(".")
    return getattr(owner.get_submodule(module_path) if module_path else owner, attr)


def _register(root: nn.Module, path: str, value: Any) -> None:
    """Put ``value`` (a module, parameter, buffer or tensor) at dotted ``path`` under ``root``."""
    *parents, last = path.split(".")
    holder = root
    for part in parents:
        if not hasattr(holder, part):
            holder.add_module(part, nn.Module())
        holder = getattr(holder, part)
    if isinstance(value, nn.Module):
        holder.add_module(last, value)
    elif isinstance(value, nn.Parameter):
        holder.register_parameter(last, value)
    else:
        holder.register_buffer(last, value) if hasattr(value, "shape") else setattr(holder, last, value)


def _order(traced: Mapping[str, TracedModel], inputs_of: Mapping[str, list[tuple[str, str | None]]],
           replaced: Mapping[str, Mapping[str, tuple[str, str | None]]], error: type[FusionError]) -> list[str]:
    """The models in an order where every source runs before the model reading it."""
    needs = {
        name: {ref[0] for ref in inputs_of.get(name, [])} | {ref[0] for ref in replaced[name].values()}
        for name in traced
    }
    order: list[str] = []
    pending = list(traced)
    while pending:
        ready = [name for name in pending if needs[name] <= set(order)]
        if not ready:
            raise error(f"wiring has a cycle between {', '.join(pending)}")
        order.append(ready[0])
        pending.remove(ready[0])
    return order


def nodes_from(graph_module: fx.GraphModule, name: str) -> list[fx.Node]:
    """The computing nodes of a merged graph that were copied from model ``name``."""
    return [n for n in graph_module.graph.nodes if n.meta.get(MERGED_FROM) == name and n.op not in ("placeholder", "output")]
