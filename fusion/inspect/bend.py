"""Inspect and bend any nn.Module: weight/activation tables, activation retrieval, reversible bending, versions.

:class:`Inspector` (alias :data:`BendedModule`) wraps a model. It lists weights and torch.fx
activations, returns activations by name or regular expression, and *bends* the model: callbacks
(:mod:`fusion.inspect.callbacks`) applied to selected weights or activations. The call forms follow
*torchbend* (Chemla--Romeu-Santos & Esling, "Unveiling the creative potential of neural networks through
network bending", 2024): ``trace(x=x)``, ``trace("forward_nobatch", x=x)``, ``activation_names(fn)``,
``get_activations("conv", "relu", x=x, fn="forward")``, ``graph(fn)``, ``interpolate(1.0, other=0.5)``.

**The wrapped model is never modified** (unless ``inplace=True`` asks for bent weights to be written
into it): forward passes substitute the bent weights with ``torch.func.functional_call`` and run on
private copies of every buffer, so a model in training mode computes with batch statistics but its
BatchNorm running statistics stay as they were. Activation bends are inserted into a copy of the
torch.fx graph (forward hooks for models fx cannot trace).

Versions (named sets of weights, :mod:`fusion.inspect.versions`) can be written, switched and interpolated.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.func import functional_call

from ..checks import eval_mode
from ..errors import BendingError
from .callbacks import BendingCallback, as_callback
from .calls import (
    ActivationBend,
    MethodCall,
    ShapeRecorder,
    apply_chain,
    call_inputs,
    checked_call,
    flat_names,
    fullmatch,
    invoke,
    is_names,
)
from .capture import (
    TracedModel,
    copy_graph_module,
    forward_hooks,
    probe_module,
    recorders,
    resolve_names,
    try_trace,
)
from .config import BendingConfig
from .tables import format_table, render_meta, short_list, tensor_meta, write_or_print
from .versions import ORIGINAL, VersionsMixin

__all__ = ["ORIGINAL", "BendedModule", "BendingConfig", "Inspector"]

FORWARD = "forward"

#: A live bend: callback, weight names, activation names.
_Bend = tuple[BendingCallback, tuple[str, ...], tuple[str, ...]]


class Inspector(VersionsMixin, nn.Module):
    """Wrap ``model`` to inspect and bend it; calling the inspector runs the bent model.

    Args:
        model: any nn.Module. It is referenced, not copied; its tensors (parameters and buffers) are
            never written unless ``inplace=True``.
        inplace: write bent / versioned weights into ``model``'s own tensors (a snapshot taken here
            lets :meth:`reset` restore them bit-exactly).

    Weights are the floating-point entries of the state dict (parameters and buffers). Activations
    are torch.fx node names (module names are accepted as aliases) of a traced method (``forward``
    unless ``fn`` names another); for models fx cannot trace, activations are the outputs of named
    modules, captured with forward hooks. Methods of the wrapped model other than ``forward`` run bent
    through :meth:`run` or as attributes (``inspector.forward_nobatch(x)``). See the module docstring
    for the version semantics.
    """

    def __init__(self, model: nn.Module, inplace: bool = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model is a {type(model).__name__}, not an nn.Module")
        self.module = model
        self.inplace = inplace
        self._snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()} if inplace else None
        self._versions: dict[str, dict[str, torch.Tensor]] = {}
        self._active: dict[str, torch.Tensor] | None = None
        self._version: str = ORIGINAL
        self._bends: list[_Bend] = []
        self._bent: dict[str, torch.Tensor] = {}
        self._traces: dict[str, TracedModel | None] = {}
        self._shapes: dict[str, dict[str, Any]] = {}
        self._cache: dict[Any, Any] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is not None and not name.startswith("_") and callable(getattr(type(module), name, None)):
                return functools.partial(self.run, name)
            raise

    # ----------------------------------------------------------------------------------- weights
    @property
    def weight_names(self) -> list[str]:
        """Names of the floating-point parameters and buffers, in state-dict order."""
        return [k for k, v in self.module.state_dict().items() if v.is_floating_point()]

    def weight_shape(self, name: str) -> torch.Size:
        """Shape of the weight ``name``."""
        state = self.module.state_dict()
        if name not in state:
            raise BendingError(f"no weight named {name!r}; weights: {short_list(self.weight_names)}")
        return state[name].shape

    def weights_table(self, bended: bool = True) -> str:
        """Table of weight names, shapes, dtypes and min/max/mean/std (current bent weights by default)."""
        state = self.bended_state_dict() if bended else self._original_state()
        rows = []
        for name in self.weight_names:
            t = state[name].detach().double()
            std = t.std().item() if t.numel() > 1 else 0.0
            stats = (t.min().item(), t.max().item(), t.mean().item(), std) if t.numel() else (math.nan,) * 4
            rows.append((name, tuple(t.shape), str(state[name].dtype).replace("torch.", ""), *(f"{s:.4g}" for s in stats)))
        return format_table(("name", "shape", "dtype", "min", "max", "mean", "std"), rows)

    def print_weights(self, bended: bool = True, out: str | Any | None = None) -> str:
        """Print :meth:`weights_table` (or write it to the text file ``out``) and return it."""
        return write_or_print(self.weights_table(bended), out)

    def _original_state(self) -> dict[str, torch.Tensor]:
        return dict(self._snapshot) if self._snapshot is not None else self.module.state_dict()

    def _base_state(self) -> dict[str, torch.Tensor]:
        return dict(self._active) if self._active is not None else self._original_state()

    def bended_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the state dict the bent model runs with (active version plus weight bends), for saving."""
        state = self._base_state()
        state.update(self._bent)
        return {k: v.detach().clone() for k, v in state.items()}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped model's own state dict (its keys, its original weights), as torchbend returns it.

        Use :meth:`bended_state_dict` for the weights the bent model runs with.
        """
        state = self.module.state_dict(*args, **kwargs)
        if self._snapshot is not None:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            for key, value in self._snapshot.items():
                state[prefix + key] = value.clone()
        return state

    # ------------------------------------------------------------------------------- activations
    def _traced(self, fn: str | None = None) -> TracedModel | None:
        fn = fn or FORWARD
        if fn not in self._traces:
            if not callable(getattr(type(self.module), fn, None)):
                raise BendingError(f"{type(self.module).__name__} has no method {fn!r}")
            self._traces[fn] = try_trace(self.module, fn)
        return self._traces[fn]

    def _require_fx(self, fn: str | None = None) -> TracedModel:
        traced = self._traced(fn)
        if traced is None:
            raise BendingError(
                f"torch.fx cannot trace {type(self.module).__name__}.{fn or FORWARD} (see the logged warning); only "
                "hook-based activations of named modules are available"
            )
        return traced

    @property
    def uses_fx(self) -> bool:
        """True when activations of ``forward`` come from a torch.fx graph, False when from forward hooks."""
        return self._traced() is not None

    def graph(self, fn: str | None = None) -> fx.Graph:
        """The torch.fx graph of method ``fn`` (``forward`` by default), without bends."""
        return self._require_fx(fn).graph

    def graph_module(self, fn: str | None = None) -> fx.GraphModule:
        """The traced GraphModule of ``fn``; its ``forward`` computes ``fn`` (shares tensors with the model)."""
        return self._require_fx(fn).graph_module

    def bend_graph(self, fn: str | None = None) -> fx.Graph:
        """The graph of ``fn`` with the activation bends inserted as nodes."""
        return self._bent_graph(fn)[0].graph

    def bended_graph_module(self, fn: str | None = None) -> fx.GraphModule:
        """A GraphModule of ``fn`` with the activation bends inserted as nodes (weights are the model's own)."""
        return self._bent_graph(fn)[0]

    def activation_names(self, fn: str | None = None) -> list[str]:
        """fx node names of ``fn`` (without the output node), or module names when fx cannot trace it."""
        traced = self._traced(fn)
        if traced is None:
            return [n for n, _ in self.module.named_modules() if n]
        return traced.node_names

    def _activation_space(self) -> tuple[list[str], dict[str, str], dict[str, tuple[str, ...]]]:
        """Activation names, module aliases and repeated modules over ``forward`` and every traced method."""
        names: list[str] = []
        aliases: dict[str, str] = {}
        repeated: dict[str, tuple[str, ...]] = {}
        self._traced()
        for fn, traced in self._traces.items():
            names.extend(self.activation_names(fn))
            if traced is not None:
                for module, node in traced.module_nodes.items():
                    aliases.setdefault(module, node)
                repeated.update(traced.repeated_modules)
        return list(dict.fromkeys(names)), aliases, repeated

    def trace(self, *args: Any, fn: str | None = None, **kwargs: Any) -> Inspector:
        """Run a method once on example inputs (in eval mode, without gradients) to record every activation's shape.

        Call forms: ``trace(x)``, ``trace(x=x)``, ``trace("forward_nobatch", x)``, ``trace(fn="...", x=x)``,
        ``trace((a, b))`` (a tuple of positional inputs) or ``trace({"x": x})`` (keyword inputs).

        Returns:
            self, for chaining.
        """
        if args and isinstance(args[0], str):
            fn, args = args[0], args[1:]
        fn = fn or FORWARD
        traced = self._traced(fn)
        args, kwargs = call_inputs(args, kwargs)
        with torch.no_grad(), eval_mode(self.module):
            if traced is not None:
                recorder = ShapeRecorder(traced.graph_module)
                invoke(lambda: recorder.run(*self._positional(traced, args, kwargs)), args, kwargs)
                shapes = recorder.shapes
            else:
                shapes = {}

                def shape_of(name: str) -> Callable[[Any], None]:
                    return lambda out: shapes.__setitem__(name, tensor_meta(out))

                with forward_hooks(self.module, {n: shape_of(n) for n in self.activation_names(fn)}):
                    invoke(lambda: self._call(fn, args, kwargs, bended=False), args, kwargs)
        self._shapes[fn] = shapes
        return self

    @staticmethod
    def _positional(traced: TracedModel, args: tuple, kwargs: dict) -> tuple:
        placeholders = [n.target for n in traced.graph.nodes if n.op == "placeholder"]
        values = list(args)
        for name in placeholders[len(values):]:
            name = name.lstrip("*")
            if name not in kwargs:
                raise TypeError(f"missing input {name!r}")
            values.append(kwargs[name])
        return tuple(values)

    def activation_shapes(self, fn: str | None = None) -> dict[str, Any]:
        """Activation name -> ``(shape, dtype)`` recorded by :meth:`trace` (a description for non-tensors)."""
        fn = fn or FORWARD
        if fn not in self._shapes:
            raise BendingError(f"activation shapes of {fn!r} are unknown: call trace({fn!r}, inputs...) first")
        return dict(self._shapes[fn])

    def activation_shape(self, name: str, fn: str | None = None) -> torch.Size | str:
        """Shape of activation ``name`` of ``fn`` recorded by :meth:`trace` (node or module name)."""
        shapes = self.activation_shapes(fn)
        traced = self._traced(fn)
        node = traced.module_nodes.get(name, name) if traced is not None else name
        if node not in shapes:
            raise BendingError(f"no activation named {name!r} in {fn or FORWARD}; known: {short_list(list(shapes))}")
        meta = shapes[node]
        return torch.Size(meta[0]) if isinstance(meta, tuple) else meta

    def activations_table(self, fn: str | None = None) -> str:
        """Table of activation names, operations and shapes of ``fn`` (requires :meth:`trace`)."""
        shapes = self.activation_shapes(fn)
        traced = self._traced(fn)
        if traced is None:
            modules = dict(self.module.named_modules())
            rows = [(n, "module", type(modules[n]).__name__, render_meta(shapes.get(n))) for n in self.activation_names(fn)]
        else:
            rows = [
                (n.name, n.op, getattr(n.target, "__name__", n.target), render_meta(shapes.get(n.name)))
                for n in traced.graph.nodes
                if n.op != "output"
            ]
        return format_table(("name", "op", "target", "shape"), rows)

    def print_activations(self, fn: str | None = None, out: str | Any | None = None) -> str:
        """Print :meth:`activations_table` (or write it to the text file ``out``) and return it."""
        return write_or_print(self.activations_table(fn), out)

    def get_activations(
        self, *names: Any, fn: str | None = None, bended: bool = True, inputs: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Activations of the (bent) model at the named layers.

        Call forms: ``get_activations("conv_0", "relu", x=x, fn="forward")`` (torchbend: the inputs are
        the method's own keyword arguments), ``get_activations("conv_0", inputs=x)`` (a tensor, a tuple
        of positional inputs or a dict of keyword inputs) or ``get_activations(x, ["conv_0", "relu"])``.

        The model runs in its current mode (call ``.eval()`` first for inference activations), on copies
        of its buffers; only the part of the graph needed for the requested layers is computed.

        Args:
            *names: activation names (fx node or module names) or regular expressions.
            fn: the method to run (``forward`` by default).
            bended: with the active version and all bends (True) or the original model (False).
            inputs: the inputs, when not given as keyword arguments.

        Returns:
            Name -> detached copy of the activation (exact names keep the spelling given; regular
            expressions yield the names they matched).
        """
        if names and not is_names(names[0]):
            if inputs is not None:
                raise BendingError("give the inputs once: first positional argument or inputs=, not both")
            inputs, names = names[0], names[1:]
        patterns = flat_names(names)
        if inputs is None:
            args, kwargs = (), kwargs
        else:
            args, kwargs = call_inputs((inputs,), {}) if not kwargs else ((inputs,), kwargs)
        fn = fn or FORWARD
        traced = self._traced(fn)
        if traced is None:
            pairs = resolve_names(patterns, self.activation_names(fn), {}, BendingError, "names")
            recorded: dict[str, Any] = {}
            record = recorders([c for _, c in pairs], recorded)
            invoke(lambda: self._call(fn, args, kwargs, bended, after=record), args, kwargs)
            return {key: recorded[c] for key, c in pairs if c in recorded}
        pairs = traced.resolve(patterns, BendingError, "names")
        chains = self._activation_chains(fn) if bended else {}
        if chains:
            graph_module, bend_nodes = self._bent_graph(fn)
            nodes = [bend_nodes.get(c, c) for _, c in pairs]
        else:
            graph_module, nodes = traced.graph_module, [c for _, c in pairs]
        key = ("probe", fn, bool(chains), tuple(nodes))
        if key not in self._cache:
            self._cache[key] = probe_module(graph_module, nodes)
        values = invoke(lambda: self._run_module(self._cache[key], args, kwargs, bended), args, kwargs)
        return {key: value for (key, _), value in zip(pairs, values)}

    # ----------------------------------------------------------------------------------- running
    def _params(self, module: nn.Module, bended: bool, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors to substitute in ``module``: the bent/versioned weights, and a private copy of every buffer."""
        if bended and not self.inplace:
            state = dict(self._active) if self._active is not None else {}
            state.update(self._bent)
        elif not bended and self.inplace:
            state = self._original_state()
        else:
            state = {}
        params = {
            n: state[n[len(prefix):]] for n, _ in module.named_parameters(remove_duplicate=False) if n[len(prefix):] in state
        }
        for name, buffer in module.named_buffers(remove_duplicate=False):
            params[name] = state.get(name[len(prefix):], buffer).detach().clone()
        return params

    def _run_module(self, module: nn.Module, args: tuple, kwargs: dict, bended: bool, prefix: str = "") -> Any:
        return functional_call(module, self._params(module, bended, prefix), args, kwargs)

    def _call(
        self, fn: str, args: tuple, kwargs: dict, bended: bool = True, after: dict[str, Callable[[Any], Any]] | None = None
    ) -> Any:
        """Run method ``fn`` of the wrapped model with the active version, bends (when ``bended``) and private buffers.

        ``after``: forward hooks (module name -> ``hook(output)``) run after the activation bends.
        """
        chains = self._activation_chains(fn) if bended else {}
        traced = self._traced(fn) if chains else None
        if traced is not None:
            return self._run_module(self._bent_graph(fn)[0], args, kwargs, bended)
        hooks = (
            forward_hooks(self.module, {n: (lambda out, _n=n, _c=c: apply_chain(_c, out, _n)) for n, c in chains.items()})
            if chains
            else contextlib.nullcontext()
        )
        with hooks, forward_hooks(self.module, after or {}):
            if fn == FORWARD:
                return self._run_module(self.module, args, kwargs, bended)
            return self._run_module(MethodCall(self.module, fn), args, kwargs, bended, prefix="inner.")

    def run(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        """Run method ``fn`` of the wrapped model bent (``inspector.run("forward_nobatch", x)``)."""
        if not callable(getattr(type(self.module), fn, None)):
            raise BendingError(f"{type(self.module).__name__} has no method {fn!r}")
        return self._call(fn, args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the bent model (active version, weight bends and activation bends).

        The model runs in its current mode with private copies of its buffers: in training mode
        BatchNorm normalises with batch statistics, but no running statistic is updated anywhere.
        """
        return self._call(FORWARD, args, kwargs)

    def _activation_chains(self, fn: str | None = None) -> dict[str, list[BendingCallback]]:
        """Activation name -> callbacks, for the activations that exist in ``fn``."""
        if not any(activations for _, _, activations in self._bends):
            return {}
        known = set(self.activation_names(fn))
        traced = self._traced(fn)
        aliases = traced.module_nodes if traced is not None else {}
        chains: dict[str, list[BendingCallback]] = {}
        for callback, _, activations in self._bends:
            for name in activations:
                node = name if name in known else aliases.get(name)
                if node in known:
                    chains.setdefault(node, []).append(callback)
        return chains

    def _bent_graph(self, fn: str | None = None) -> tuple[fx.GraphModule, dict[str, str]]:
        fn = fn or FORWARD
        key = ("bent_graph", fn)
        if key not in self._cache:
            source = self._require_fx(fn).graph_module
            graph_module = copy_graph_module(source, f"Bended{type(self.module).__name__}")
            nodes = {n.name: n for n in graph_module.graph.nodes}
            bend_nodes = {}
            for k, (name, chain) in enumerate(self._activation_chains(fn).items()):
                target = f"_fusion_bend_{k}"
                graph_module.add_submodule(target, ActivationBend(name, chain))
                with graph_module.graph.inserting_after(nodes[name]):
                    new = graph_module.graph.call_module(target, (nodes[name],))
                nodes[name].replace_all_uses_with(new, delete_user_cb=lambda user, _new=new: user is not _new)
                bend_nodes[name] = new.name
            graph_module.graph.lint()
            graph_module.recompile()
            self._cache[key] = (graph_module, bend_nodes)
        return self._cache[key]

    # ----------------------------------------------------------------------------------- bending
    def resolve_targets(self, names: str | Sequence[str]) -> tuple[list[str], list[str]]:
        """Split names/regexes into ``(weight names, activation names)``; exact names win over regexes.

        A regular expression is matched against weight names and activation names (node names, then
        module names) of ``forward`` and of every traced method alike.

        Raises:
            BendingError: a name matches nothing, is an ambiguous module name, or is an invalid regex.
        """
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise BendingError("name at least one weight or activation to bend")
        weight_names = self.weight_names
        activation_names, aliases, repeated = self._activation_space()
        weights: list[str] = []
        activations: list[str] = []
        for pattern in names:
            if not isinstance(pattern, str):
                raise BendingError(f"names must be strings, got {type(pattern).__name__}")
            if pattern in repeated:
                raise BendingError(
                    f"module {pattern!r} runs {len(repeated[pattern])} times in forward; name one of its nodes: "
                    f"{', '.join(repeated[pattern])}"
                )
            if pattern in weight_names:
                weights.append(pattern)
                continue
            try:
                found = [c for _, c in resolve_names(pattern, activation_names, aliases, BendingError)]
            except BendingError:
                found = []
            exact = pattern in activation_names or pattern in aliases
            matched_weights = [] if exact else [w for w in weight_names if fullmatch(pattern, w)]
            if not found and not matched_weights:
                raise BendingError(
                    f"no weight or activation named or matching {pattern!r}; weights: {short_list(weight_names)}; "
                    f"activations: {short_list(activation_names)}"
                )
            weights.extend(matched_weights)
            activations.extend(found)
        return list(dict.fromkeys(weights)), list(dict.fromkeys(activations))

    def bend(self, callback: BendingCallback | BendingConfig | Callable[[torch.Tensor], torch.Tensor], *names: str) -> Inspector:
        """Attach ``callback`` to the named weights and activations (or apply a whole :class:`BendingConfig`).

        Args:
            callback: a :class:`~fusion.inspect.callbacks.BendingCallback`, a plain ``fn(tensor) -> tensor``,
                or a BendingConfig (then no names).
            *names: weight names, activation names or regular expressions.

        Returns:
            self, for chaining. Nothing changes when a bend is rejected.

        Raises:
            BendingError: unknown name, a callback failing on its target, or a result of another shape.
        """
        if isinstance(callback, BendingConfig):
            if names:
                raise BendingError("pass names inside the BendingConfig, not to bend()")
            saved = list(self._bends)
            try:
                for cb, patterns in callback.entries:
                    self.bend(cb, *patterns)
            except BendingError:
                self._bends = saved
                self._refresh()
                raise
            return self
        callback = as_callback(callback)
        weights, activations = self.resolve_targets(list(names))
        bends = [*self._bends, (callback, tuple(weights), tuple(activations))]
        bent = self._compute_bent(self._base_state(), bends)
        self._check_activation_bend(callback, activations)
        self._bends, self._bent = bends, bent
        self._refresh(recompute=False)
        return self

    def _check_activation_bend(self, callback: BendingCallback, activations: list[str]) -> None:
        """Try ``callback`` on zeros shaped like each traced activation (skipped before :meth:`trace`)."""
        for shapes in self._shapes.values():
            for name in activations:
                meta = shapes.get(name)
                if isinstance(meta, tuple):
                    checked_call(callback, torch.zeros(meta[0], dtype=meta[1]), name, "activation")

    @staticmethod
    def _compute_bent(base: dict[str, torch.Tensor], bends: list[_Bend]) -> dict[str, torch.Tensor]:
        bent: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for callback, names, _ in bends:
                for name in names:
                    current = bent.get(name, base[name])
                    out = checked_call(callback, current, name, "weight")
                    bent[name] = out.detach().to(dtype=current.dtype, device=current.device)
        return bent

    def _refresh(self, recompute: bool = True) -> None:
        """Recompute bent weights from the active version, drop cached graphs, write back when inplace."""
        if recompute:
            self._bent = self._compute_bent(self._base_state(), self._bends)
        self._cache.clear()
        if self.inplace:
            target = self.module.state_dict()
            with torch.no_grad():
                for key, value in self.bended_state_dict().items():
                    if target[key].data_ptr() != value.data_ptr():
                        target[key].copy_(value)

    def bending_config(self) -> BendingConfig:
        """The live bends, with concrete names, as a :class:`BendingConfig`."""
        return BendingConfig(*((cb, w + a) for cb, w, a in self._bends), bound_to=type(self.module).__name__)

    def reset(self) -> Inspector:
        """Remove every bend and return to the original weights (saved versions are kept)."""
        self._bends, self._active, self._version = [], None, ORIGINAL
        self._refresh()
        return self

#: Alias of :class:`Inspector` (the name used by torchbend).
BendedModule = Inspector
