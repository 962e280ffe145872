"""Neuronswap-style calls: list a model's layers, report skip connections, move chosen units to the front.

Code written for the *neuronswap* library runs with only its import lines changed::

    import fusion.neuronswap as ns, fusion.neuronswap as modx

    graph = torch.fx.symbolic_trace(model).graph
    layers_list = modx.get_layers_list(graph, model)          # or get_layers_list(model)
    skip_connections = modx.get_skipped_layers(graph, layers_list)
    ns.swap(layers_list, {"fc1": [4, 9], "fc2": [3, 6]}, skip_connections)

The swap goes through the permutation spec (:func:`fusion.permutation_spec`), so every tensor
coupled to a layer's units moves with them and the model computes the same function:

* the listed units of each layer move to the front of the layer, in the order given, the other
  units follow in their original order;
* several layers are swapped at once; layers whose units are tied together (a residual stream)
  share one permutation, so they must be given the same indices;
* layers on a skip connection are permuted too (with the whole residual stream they belong to):
  ``skip_connections`` is accepted for compatibility and only logged, nothing is refused;
* the model's output layer (and any other layer whose units cannot move) is skipped with a
  :class:`UserWarning` naming the reason;
* a normalisation layer (``bn1``) stands for the units it normalises.

The spec needs example inputs; when none are given they are made up from the first layer
(``(2, in_features)`` for a Linear, ``(2, C, S, S)`` for a Conv2d with the first size ``S`` of 32,
64, 224 the model accepts, token ids for an Embedding). Pass ``example_inputs=`` for other models.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from .checks import eval_mode, run_model
from .errors import DataError, PermutationError, TraceError
from .permute import layer_group, permute, unit_index
from .spec import PermutationSpec, permutation_spec

__all__ = ["DEPTHS", "LayerList", "get_layers_list", "get_skipped_layers", "layer_at_depth", "layer_blocks", "swap"]

logger = logging.getLogger(__name__)

_TRIAL_SIZES = (32, 64, 224)

#: The depths :func:`layer_at_depth` knows.
DEPTHS = ("early", "mid", "late")


class LayerList(list):
    """The layers of a model (modules owning parameters) in execution order: a ``list[nn.Module]``.

    Attributes:
        model: the model the layers belong to.
        names: the layers' qualified names, in the same order.
        example_inputs: inputs used to build the permutation spec (made up from the first layer if None).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], example_inputs: Any = None) -> None:
        modules = dict(model.named_modules())
        super().__init__(modules[name] for name in names)
        self.model = model
        self.names = tuple(names)
        self.example_inputs = example_inputs
        self._spec: PermutationSpec | None = None

    def named(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` pairs in execution order."""
        return list(zip(self.names, self))

    def spec(self) -> PermutationSpec:
        """The model's permutation spec (built once, on :attr:`example_inputs`)."""
        if self._spec is None:
            inputs = self.example_inputs if self.example_inputs is not None else _made_up_inputs(self.model, self)
            self._spec = permutation_spec(self.model, inputs)
        return self._spec


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _names_from_graph(graph: fx.Graph, model: nn.Module) -> list[str]:
    modules = dict(model.named_modules())
    names: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module" and node.target in modules and node.target not in names:
            owners = [n for n, m in modules[node.target].named_modules() if _owns_parameters(m)]
            names += [f"{node.target}.{n}" if n else str(node.target) for n in owners]
    return list(dict.fromkeys(names))


def _names_from_hooks(model: nn.Module, example_inputs: Any) -> list[str]:
    names: list[str] = []
    _run_hooked(model, example_inputs, [module.register_forward_pre_hook(lambda _m, _a, name=name: names.append(name))
                                        for name, module in model.named_modules() if _owns_parameters(module)])
    return list(dict.fromkeys(names))


def _run_hooked(model: nn.Module, example_inputs: Any, handles: list[Any]) -> None:
    """One forward pass in eval mode without gradients, then remove the hooks ``handles``."""
    try:
        with torch.no_grad(), eval_mode(model):
            run_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()


def get_layers_list(graph_or_model: fx.Graph | nn.Module, model: nn.Module | None = None,
                    example_inputs: Any = None) -> LayerList:
    """The model's layers (modules owning parameters) in the order the forward pass runs them.

    Args:
        graph_or_model: the model, or its ``torch.fx`` graph (neuronswap's form
            ``get_layers_list(torch.fx.symbolic_trace(model).graph, model)``).
        model: the model, when the first argument is a graph.
        example_inputs: inputs for the permutation spec and, for models ``torch.fx`` cannot trace,
            for recording the execution order with forward hooks (made up from the first layer if None).

    Returns:
        A :class:`LayerList` (a list of modules that also knows their names and the model).

    Raises:
        DataError: a graph without its model, or something that is neither.
        TraceError: the model can be neither traced nor run on the (made-up) inputs.
    """
    graph: fx.Graph | None = None
    if isinstance(graph_or_model, fx.Graph):
        graph = graph_or_model
        if not isinstance(model, nn.Module):
            raise DataError("get_layers_list(graph, model): pass the model the graph was traced from")
    elif isinstance(graph_or_model, nn.Module):
        if isinstance(graph_or_model, fx.GraphModule) and model is not None:
            graph = graph_or_model.graph
        model = graph_or_model if model is None else model
    else:
        raise DataError(f"get_layers_list expects a model or its torch.fx graph, got {type(graph_or_model).__name__}")
    if graph is None:
        try:
            graph = fx.symbolic_trace(model).graph
        except Exception as exc:  # torch.fx raises many kinds of exceptions on untraceable code
            logger.info("torch.fx cannot trace %s (%s); recording the layer order with hooks",
                        type(model).__name__, exc)
    if graph is not None:
        names = _names_from_graph(graph, model)
    else:
        inputs = example_inputs if example_inputs is not None else _made_up_inputs(model, None)
        names = _names_from_hooks(model, inputs)
    return LayerList(model, names, example_inputs)


def _as_layers(model_or_layers: nn.Module | LayerList, example_inputs: Any) -> LayerList:
    if isinstance(model_or_layers, LayerList):
        if example_inputs is not None and model_or_layers.example_inputs is None:
            model_or_layers.example_inputs = example_inputs
        return model_or_layers
    if isinstance(model_or_layers, (nn.Module, fx.Graph)):
        return get_layers_list(model_or_layers, example_inputs=example_inputs)
    raise DataError(f"expected a model or the result of get_layers_list, got {type(model_or_layers).__name__}")


def get_skipped_layers(graph_or_layers: fx.Graph | nn.Module | LayerList, layers_list: LayerList | None = None,
                       example_inputs: Any = None) -> list[str]:
    """Names of the layers whose output units sit on a skip connection (a residual stream), in execution order.

    These units are shared by several layers (every block writing into the stream, the norms on
    it), so permuting one of them moves the whole stream; ``fusion`` does that function-preservingly,
    so the list is a report, not a restriction.

    Args:
        graph_or_layers: a :class:`LayerList`, a model, or a ``torch.fx`` graph followed by ``layers_list``
            (neuronswap's form ``get_skipped_layers(graph, layers_list)``).
        layers_list: from :func:`get_layers_list`, when the first argument is a graph.
        example_inputs: inputs for the permutation spec (made up from the first layer if None).
    """
    if isinstance(graph_or_layers, fx.Graph):
        if not isinstance(layers_list, LayerList):
            raise DataError("get_skipped_layers(graph, layers_list): pass the result of get_layers_list")
        graph_or_layers = layers_list
    layers = _as_layers(graph_or_layers, example_inputs)
    spec = layers.spec()
    skipped = []
    for name in layers.names:
        try:
            group = layer_group(spec, name)
        except PermutationError:
            continue
        if len(group.producers) > 1:
            skipped.append(name)
    return skipped


def _front_order(indices: Any, layer: str, size: int) -> torch.Tensor:
    """The permutation moving ``indices`` (in the order given) to the front, the rest after them in order."""
    if isinstance(indices, (torch.Tensor, np.ndarray)) and indices.ndim == 0:
        indices = [indices]
    if isinstance(indices, (torch.Tensor, np.ndarray)):
        indices = indices.reshape(-1).tolist()
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise PermutationError(f"the indices of {layer!r} must be an iterable of unit indices, got {indices!r}")
    front = [unit_index(value, f"index {k} of {layer!r}", layer, size) for k, value in enumerate(indices)]
    if len(set(front)) != len(front):
        raise PermutationError(f"the indices of {layer!r} repeat a unit: {front}")
    chosen = set(front)
    return torch.tensor(front + [u for u in range(size) if u not in chosen], dtype=torch.long)


def swap(
    model_or_layers: nn.Module | LayerList,
    equilibrium_mask: Mapping[str, Any],
    skip_connections: Iterable[str] = (),
    inplace: bool = True,
    example_inputs: Any = None,
    spec: PermutationSpec | None = None,
) -> nn.Module:
    """Move the listed units of each layer to the front of that layer, keeping the model's function.

    Args:
        model_or_layers: the model, or its :class:`LayerList` (neuronswap's ``module_list``).
        equilibrium_mask: layer name -> the units to move to the front (tensor, array or list of
            indices, in the order they should take).
        skip_connections: layers on a skip connection (from :func:`get_skipped_layers`); accepted for
            neuronswap compatibility and logged: ``fusion`` permutes them with their residual stream.
        inplace: modify the model itself (neuronswap's behaviour, the default) or return a permuted copy.
        example_inputs: inputs for the permutation spec (made up from the first layer if None).
        spec: a precomputed permutation spec of the model.

    Returns:
        The swapped model (the input model itself when ``inplace``).

    Raises:
        PermutationError: an unknown layer, bad or repeated indices, or two layers of one residual
            stream given different indices. Nothing is modified then.
    """
    layers = _as_layers(model_or_layers, example_inputs)
    spec = layers.spec() if spec is None else spec
    if not isinstance(equilibrium_mask, Mapping):
        raise PermutationError(f"equilibrium_mask must map layer names to indices, got {type(equilibrium_mask).__name__}")
    skip = set(skip_connections or ())
    refused = {s.name: s.reason for s in spec.skipped}
    perms: dict[str, torch.Tensor] = {}
    owners: dict[str, str] = {}
    for layer, indices in equilibrium_mask.items():
        try:
            group = layer_group(spec, layer)
        except PermutationError:
            if layer not in refused:
                raise
            warnings.warn(f"swap: layer {layer!r} skipped: {refused[layer]}", UserWarning, stacklevel=2)
            continue
        order = _front_order(indices, layer, group.size)
        if group.name in perms and not torch.equal(perms[group.name], order):
            raise PermutationError(
                f"layers {owners[group.name]!r} and {layer!r} share their units (one residual stream, group "
                f"{group.name!r}) but were given different indices"
            )
        perms[group.name], owners[group.name] = order, layer
        if layer in skip or len(group.producers) > 1:
            logger.info("swap: %r is on a skip connection; its whole residual stream (%s) is permuted with it",
                        layer, ", ".join(group.producers))
    return permute(layers.model, perms, spec, inplace=inplace)


def layer_blocks(model: nn.Module, example_inputs: Any, spec: PermutationSpec | None = None) -> list[list[str]]:
    """The model's permutable layers grouped into blocks, in execution order.

    Convolutions whose output units can be permuted are grouped by the spatial size of their
    outputs: a block ends where pooling or a strided convolution shrinks the feature map (VGG-16
    has five blocks of two or three convolutions; a ResNet one block per stage). Models without
    permutable convolutions give one block per permutable Linear layer.

    Args:
        model: the model.
        example_inputs: a batch the model accepts (its spatial size decides the output sizes).
        spec: the model's permutation spec (built on ``example_inputs`` if None).
    """
    spec = permutation_spec(model, example_inputs) if spec is None else spec
    candidates = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, _ConvNd)):
            try:
                layer_group(spec, name)
            except PermutationError:
                continue
            candidates[name] = module
    sizes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                sizes.setdefault(name, tuple(output.shape[2:]))
        return hook

    _run_hooked(model, example_inputs, [module.register_forward_hook(record(name)) for name, module in candidates.items()])
    convs = [name for name in sizes if isinstance(candidates[name], _ConvNd)]
    if not convs:
        return [[name] for name in sizes]
    blocks: list[list[str]] = []
    for name in convs:
        if blocks and sizes[blocks[-1][-1]] == sizes[name]:
            blocks[-1].append(name)
        else:
            blocks.append([name])
    return blocks


def layer_at_depth(model: nn.Module, depth: str, example_inputs: Any, spec: PermutationSpec | None = None) -> str:
    """The layer of the mode-connectivity neuron-swap study at ``depth`` (see :func:`layer_blocks`).

    * ``"early"``: layer 0 of block 0 (VGG-16: the first convolution, 64 filters);
    * ``"mid"``: layer 1 of the middle block, ``blocks[len(blocks) // 2]`` (VGG-16: block 2, 256 filters);
    * ``"late"``: layer 1 of the last block (VGG-16: block 4, 512 filters).

    A block with a single layer gives its layer 0.

    Raises:
        PermutationError: an unknown depth, or a model without permutable layers.
    """
    if depth not in DEPTHS:
        raise PermutationError(f"depth must be one of {DEPTHS}, got {depth!r}")
    blocks = layer_blocks(model, example_inputs, spec)
    if not blocks:
        raise PermutationError(f"{type(model).__name__} has no permutable convolution or linear layer")
    block = blocks[{"early": 0, "mid": len(blocks) // 2, "late": len(blocks) - 1}[depth]]
    return block[min(0 if depth == "early" else 1, len(block) - 1)]


def _made_up_inputs(model: nn.Module, layers: LayerList | None) -> Any:
    """A batch of two inputs shaped for the model's first layer (see the module docstring)."""
    first = next((m for m in (layers if layers is not None else []) if _first_layer_kind(m)), None)
    if first is None:
        first = next((m for m in model.modules() if _first_layer_kind(m)), None)
    if first is None:
        raise DataError(f"cannot make up inputs for {type(model).__name__}: pass example_inputs=")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(first, nn.Embedding):
        return torch.randint(0, first.num_embeddings, (2, 8), device=device)
    if isinstance(first, nn.Linear):
        return torch.randn(2, first.in_features, device=device)
    dims = len(first.kernel_size)
    errors = []
    for size in _TRIAL_SIZES:
        inputs = torch.randn(2, first.in_channels, *([size] * dims), device=device)
        try:
            with torch.no_grad(), eval_mode(model):
                run_model(model, inputs)
            return inputs
        except Exception as exc:  # a forward on a wrong size raises anything
            errors.append(f"{tuple(inputs.shape)}: {type(exc).__name__}")
    raise TraceError(f"cannot make up inputs for {type(model).__name__} ({'; '.join(errors)}): pass example_inputs=")


def _first_layer_kind(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, _ConvNd)) and not getattr(module, "transposed", False)
