"""Inspect and bend any nn.Module: weight/activation tables, activation retrieval, reversible bending, versions.

:class:`Inspector` (alias :data:`BendedModule`) wraps a model. It lists weights and torch.fx
activations, returns activations by name or regular expression, and *bends* the model: callbacks
(:mod:`fusion.inspect.callbacks`) applied to selected weights or activations. Bends never write to the
wrapped model's tensors (the forward pass substitutes the bent weights with
``torch.func.functional_call``) unless ``inplace=True``; activation bends are inserted into a copy of
the torch.fx graph (forward hooks for models fx cannot trace). :class:`BendingConfig` describes a set of
bends as data (JSON, ``+``, binding to a model). Weight *versions* store snapshots that can be
activated or linearly interpolated. The design follows *torchbend* (Chemla--Romeu-Santos & Esling,
"Unveiling the creative potential of neural networks through network bending", 2024).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import torch
from torch import fx, nn
from torch.func import functional_call

from ..analysis.io import write_text
from ..checks import describe_shapes, eval_mode, run_model
from ..errors import BendingError
from .callbacks import BendingCallback, as_callback, callback_from_dict
from .capture import (
    TracedModel,
    copy_graph_module,
    forward_hooks,
    probe_module,
    recorders,
    resolve_names,
    try_trace,
)

__all__ = ["ORIGINAL", "BendedModule", "BendingConfig", "Inspector"]

#: Name of the version holding the wrapped model's own weights.
ORIGINAL = "original"
_CONFIG_FORMAT = "fusion.bending_config/1"

Entry = tuple[BendingCallback, tuple[str, ...]]


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _meta(value: Any) -> tuple[tuple[int, ...], torch.dtype] | str:
    """``(shape, dtype)`` of a tensor, or a shape description of anything else."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    return describe_shapes(value)


def _render(meta: tuple[tuple[int, ...], torch.dtype] | str | None) -> str:
    if meta is None:
        return "not run"
    if isinstance(meta, str):
        return meta
    return f"{meta[0]} {str(meta[1]).replace('torch.', '')}"


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

    def bind(self, target: Inspector | nn.Module) -> BendingConfig:
        """Resolve every name/regex against ``target`` (an Inspector or a model); returns a new config.

        Raises:
            BendingError: a name matches no weight or activation of ``target``.
        """
        inspector = target if isinstance(target, Inspector) else Inspector(target)
        entries = []
        for callback, patterns in self.entries:
            weights, activations = inspector.resolve_targets(patterns)
            entries.append((callback, tuple(weights + activations)))
        return BendingConfig(*entries, bound_to=type(inspector.module).__name__)

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


def _apply_chain(callbacks: Sequence[BendingCallback], value: Any, name: str) -> Any:
    for callback in callbacks:
        if not isinstance(value, torch.Tensor):
            raise BendingError(
                f"activation {name!r} is a {type(value).__name__}, not a tensor; bend one of its elements "
                "(a getitem node) instead"
            )
        value = callback(value, name)
    return value


class _ActivationBend(nn.Module):
    """Graph node applying a chain of callbacks to one activation."""

    def __init__(self, name: str, callbacks: Sequence[BendingCallback]) -> None:
        super().__init__()
        self.activation = name
        self.callbacks = tuple(callbacks)

    def forward(self, value: Any) -> Any:
        return _apply_chain(self.callbacks, value, self.activation)


class _ShapeRecorder(fx.Interpreter):
    """Interpreter recording a description of every node's value."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.shapes: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.op != "output":
            self.shapes[n.name] = _meta(value)
        return value


class _Restore:
    """Returned by :meth:`Inspector.set_version`: the change is immediate; ``with`` undoes it on exit."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo = undo

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._undo()


class Inspector(nn.Module):
    """Wrap ``model`` to inspect and bend it; calling the inspector runs the bent model.

    Args:
        model: any nn.Module. It is referenced, not copied; its tensors are never written unless
            ``inplace=True``.
        inplace: write bent / versioned weights into ``model``'s own tensors (a snapshot taken here
            lets :meth:`reset` restore them bit-exactly).

    Weights are the floating-point entries of the state dict (parameters and buffers). Activations
    are torch.fx node names (module names are accepted as aliases); for models fx cannot trace,
    activations are the outputs of named modules, captured with forward hooks.
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
        self._version: str | None = ORIGINAL
        self._weight_bends: list[Entry] = []
        self._activation_bends: list[Entry] = []
        self._entries: list[Entry] = []
        self._bent: dict[str, torch.Tensor] = {}
        self._trace_state: dict[str, Any] = {}
        self._cache: dict[Any, Any] = {}

    # ----------------------------------------------------------------------------------- weights
    @property
    def weight_names(self) -> list[str]:
        """Names of the floating-point parameters and buffers, in state-dict order."""
        return [k for k, v in self.module.state_dict().items() if v.is_floating_point()]

    def weights_table(self, bended: bool = True) -> str:
        """Table of weight names, shapes, dtypes and min/max/mean/std (current bent weights by default)."""
        state = self.bended_state_dict() if bended else self._original_state()
        rows = []
        for name in self.weight_names:
            t = state[name].detach().double()
            std = t.std().item() if t.numel() > 1 else 0.0
            stats = (t.min().item(), t.max().item(), t.mean().item(), std) if t.numel() else (math.nan,) * 4
            rows.append((name, tuple(t.shape), str(state[name].dtype).replace("torch.", ""), *(f"{s:.4g}" for s in stats)))
        return _format_table(("name", "shape", "dtype", "min", "max", "mean", "std"), rows)

    def print_weights(self, bended: bool = True) -> str:
        """Print :meth:`weights_table` and return it."""
        table = self.weights_table(bended)
        print(table)
        return table

    def _original_state(self) -> dict[str, torch.Tensor]:
        return dict(self._snapshot) if self._snapshot is not None else self.module.state_dict()

    def _base_state(self) -> dict[str, torch.Tensor]:
        return dict(self._active) if self._active is not None else self._original_state()

    def bended_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the state dict the bent model runs with (active version plus weight bends), for saving."""
        state = self._base_state()
        state.update(self._bent)
        return {k: v.detach().clone() for k, v in state.items()}

    # ------------------------------------------------------------------------------- activations
    def _traced(self) -> TracedModel | None:
        if "traced" not in self._trace_state:
            self._trace_state["traced"] = try_trace(self.module)
        return self._trace_state["traced"]

    def _require_fx(self) -> TracedModel:
        traced = self._traced()
        if traced is None:
            raise BendingError(
                f"torch.fx cannot trace {type(self.module).__name__} (see the logged warning); only hook-based "
                "activations of named modules are available"
            )
        return traced

    @property
    def uses_fx(self) -> bool:
        """True when activations come from a torch.fx graph, False when from forward hooks."""
        return self._traced() is not None

    @property
    def graph(self) -> fx.Graph:
        """The torch.fx graph of the model's forward (raises BendingError if fx cannot trace it)."""
        return self._require_fx().graph

    @property
    def graph_module(self) -> fx.GraphModule:
        """The traced GraphModule (shares submodules and tensors with the wrapped model)."""
        return self._require_fx().graph_module

    def bended_graph_module(self) -> fx.GraphModule:
        """A GraphModule with the activation bends inserted as nodes (weights are the model's own)."""
        return self._bent_graph()[0]

    @property
    def activation_names(self) -> list[str]:
        """fx node names (without the output node), or module names when fx cannot trace the model."""
        traced = self._traced()
        if traced is None:
            return [n for n, _ in self.module.named_modules() if n]
        return traced.node_names

    def _activation_aliases(self) -> dict[str, str]:
        traced = self._traced()
        return traced.module_nodes if traced is not None else {}

    def trace(self, example_inputs: Any) -> Inspector:
        """Run ``example_inputs`` once (in eval mode, without gradients) to record every activation's shape.

        Args:
            example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.

        Returns:
            self, for chaining.
        """
        traced = self._traced()
        with torch.no_grad(), eval_mode(self.module):
            if traced is not None:
                recorder = _ShapeRecorder(traced.graph_module)
                run_model(lambda *a, **k: recorder.run(*self._positional(traced, a, k)), example_inputs)
                shapes = recorder.shapes
            else:
                shapes = {}

                def shape_of(name: str) -> Callable[[Any], None]:
                    return lambda out: shapes.__setitem__(name, _meta(out))

                with forward_hooks(self.module, {n: shape_of(n) for n in self.activation_names}):
                    run_model(self.module, example_inputs)
        self._trace_state["shapes"] = shapes
        return self

    @staticmethod
    def _positional(traced: TracedModel, args: tuple, kwargs: dict) -> tuple:
        placeholders = [n.target for n in traced.graph.nodes if n.op == "placeholder"]
        values = list(args)
        for name in placeholders[len(values):]:
            if name not in kwargs:
                raise TypeError(f"missing input {name!r}")
            values.append(kwargs[name])
        return tuple(values)

    @property
    def activation_shapes(self) -> dict[str, Any]:
        """Activation name -> ``(shape, dtype)`` recorded by :meth:`trace` (a description for non-tensors)."""
        if "shapes" not in self._trace_state:
            raise BendingError("activation shapes are unknown: call trace(example_inputs) first")
        return dict(self._trace_state["shapes"])

    def activations_table(self) -> str:
        """Table of activation names, operations and shapes (requires :meth:`trace`)."""
        shapes = self.activation_shapes
        traced = self._traced()
        if traced is None:
            modules = dict(self.module.named_modules())
            rows = [(n, "module", type(modules[n]).__name__, _render(shapes.get(n))) for n in self.activation_names]
        else:
            rows = [
                (n.name, n.op, getattr(n.target, "__name__", n.target), _render(shapes.get(n.name)))
                for n in traced.graph.nodes
                if n.op != "output"
            ]
        return _format_table(("name", "op", "target", "shape"), rows)

    def print_activations(self) -> str:
        """Print :meth:`activations_table` and return it."""
        table = self.activations_table()
        print(table)
        return table

    def get_activations(self, inputs: Any, names: str | Sequence[str], bended: bool = True) -> dict[str, Any]:
        """Activations of the (bent) model at the named layers for ``inputs``.

        The model runs in its current mode (call ``.eval()`` first for inference activations);
        only the part of the graph needed for the requested layers is computed.

        Args:
            inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
            names: activation names (fx node or module names) or regular expressions.
            bended: with the active version and all bends (True) or the original model (False).

        Returns:
            Name -> detached copy of the activation (exact names keep the spelling given; regular
            expressions yield the names they matched).
        """
        traced = self._traced()
        if traced is None:
            pairs = resolve_names(names, self.activation_names, {}, BendingError, "names")
            recorded: dict[str, Any] = {}
            with self._hook_bends(bended), forward_hooks(self.module, recorders([c for _, c in pairs], recorded)):
                self._run(self.module, inputs, bended)
            return {key: recorded[c] for key, c in pairs if c in recorded}
        pairs = traced.resolve(names, BendingError, "names")
        if bended and self._activation_bends:
            graph_module, bend_nodes = self._bent_graph()
            nodes = [bend_nodes.get(c, c) for _, c in pairs]
        else:
            graph_module, nodes = traced.graph_module, [c for _, c in pairs]
        key = ("probe", bended and bool(self._activation_bends), tuple(nodes))
        if key not in self._cache:
            self._cache[key] = probe_module(graph_module, nodes)
        values = self._run(self._cache[key], inputs, bended)
        return {key: value for (key, _), value in zip(pairs, values)}

    # ----------------------------------------------------------------------------------- running
    def _params(self, bended: bool) -> dict[str, torch.Tensor]:
        if not bended:
            return self._original_state() if self.inplace else {}
        if self.inplace:
            return {}
        params = dict(self._active) if self._active is not None else {}
        params.update(self._bent)
        return params

    def _run(self, module: nn.Module, inputs: Any, bended: bool) -> Any:
        params = self._params(bended)
        return run_model(lambda *args, **kwargs: _call_with(module, params, args, kwargs), inputs, "inputs")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the bent model (active version, weight bends and activation bends).

        The model runs in its current mode; in training mode BatchNorm layers update the running
        statistics of the weights in use (the active version's copies when ``inplace=False``).
        """
        uses_graph = bool(self._activation_bends) and self._traced() is not None
        module = self._bent_graph()[0] if uses_graph else self.module
        with self._hook_bends(True):
            return _call_with(module, self._params(True), args, kwargs)

    def _hook_bends(self, bended: bool) -> contextlib.AbstractContextManager:
        if not bended or not self._activation_bends or self._traced() is not None:
            return contextlib.nullcontext()
        chains = self._activation_chains()
        return forward_hooks(self.module, {n: (lambda out, _n=n, _c=c: _apply_chain(_c, out, _n)) for n, c in chains.items()})

    def _activation_chains(self) -> dict[str, list[BendingCallback]]:
        chains: dict[str, list[BendingCallback]] = {}
        for callback, names in self._activation_bends:
            for name in names:
                chains.setdefault(name, []).append(callback)
        return chains

    def _bent_graph(self) -> tuple[fx.GraphModule, dict[str, str]]:
        if "bent_graph" not in self._cache:
            graph_module = copy_graph_module(self._require_fx().graph_module, f"Bended{type(self.module).__name__}")
            nodes = {n.name: n for n in graph_module.graph.nodes}
            bend_nodes = {}
            for k, (name, chain) in enumerate(self._activation_chains().items()):
                target = f"_fusion_bend_{k}"
                graph_module.add_submodule(target, _ActivationBend(name, chain))
                with graph_module.graph.inserting_after(nodes[name]):
                    new = graph_module.graph.call_module(target, (nodes[name],))
                nodes[name].replace_all_uses_with(new, delete_user_cb=lambda user, _new=new: user is not _new)
                bend_nodes[name] = new.name
            graph_module.graph.lint()
            graph_module.recompile()
            self._cache["bent_graph"] = (graph_module, bend_nodes)
        return self._cache["bent_graph"]

    # ----------------------------------------------------------------------------------- bending
    def resolve_targets(self, names: str | Sequence[str]) -> tuple[list[str], list[str]]:
        """Split names/regexes into ``(weight names, activation names)``; exact names win over regexes.

        A regular expression is matched against weight names and activation names (node names, then
        module names) alike.

        Raises:
            BendingError: a name matches nothing, is an ambiguous module name, or is an invalid regex.
        """
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise BendingError("name at least one weight or activation to bend")
        weight_names = self.weight_names
        activation_names, aliases = self.activation_names, self._activation_aliases()
        repeated = self._traced().repeated_modules if self._traced() is not None else {}
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
            matched_weights = [] if exact else [w for w in weight_names if _fullmatch(pattern, w)]
            if not found and not matched_weights:
                raise BendingError(
                    f"no weight or activation named or matching {pattern!r}; weights: {_short(weight_names)}; "
                    f"activations: {_short(activation_names)}"
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
            saved = (list(self._weight_bends), list(self._activation_bends), list(self._entries))
            try:
                for cb, patterns in callback.entries:
                    self.bend(cb, *patterns)
            except BendingError:
                self._weight_bends, self._activation_bends, self._entries = saved
                self._refresh()
                raise
            return self
        callback = as_callback(callback)
        weights, activations = self.resolve_targets(list(names))
        weight_bends = self._weight_bends + ([(callback, tuple(weights))] if weights else [])
        bent = self._compute_bent(self._base_state(), weight_bends)
        self._check_activation_bend(callback, activations)
        self._weight_bends = weight_bends
        if activations:
            self._activation_bends.append((callback, tuple(activations)))
        self._entries.append((callback, tuple(weights + activations)))
        self._bent = bent
        self._refresh(recompute=False)
        return self

    def _check_activation_bend(self, callback: BendingCallback, activations: list[str]) -> None:
        """Try ``callback`` on zeros shaped like each traced activation (skipped before :meth:`trace`)."""
        shapes = self._trace_state.get("shapes", {})
        for name in activations:
            meta = shapes.get(name)
            if isinstance(meta, tuple):
                _checked_call(callback, torch.zeros(meta[0], dtype=meta[1]), name, "activation")

    @staticmethod
    def _compute_bent(base: dict[str, torch.Tensor], weight_bends: list[Entry]) -> dict[str, torch.Tensor]:
        bent: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for callback, names in weight_bends:
                for name in names:
                    current = bent.get(name, base[name])
                    out = _checked_call(callback, current, name, "weight")
                    bent[name] = out.detach().to(dtype=current.dtype, device=current.device)
        return bent

    def _refresh(self, recompute: bool = True) -> None:
        """Recompute bent weights from the active version, drop cached graphs, write back when inplace."""
        if recompute:
            self._bent = self._compute_bent(self._base_state(), self._weight_bends)
        self._cache.clear()
        if self.inplace:
            target = self.module.state_dict()
            with torch.no_grad():
                for key, value in self.bended_state_dict().items():
                    if target[key].data_ptr() != value.data_ptr():
                        target[key].copy_(value)

    def bending_config(self) -> BendingConfig:
        """The bends applied so far, with concrete names, as a :class:`BendingConfig`."""
        return BendingConfig(*self._entries, bound_to=type(self.module).__name__)

    def reset(self) -> Inspector:
        """Remove every bend and return to the original weights (saved versions are kept)."""
        self._weight_bends, self._activation_bends, self._entries = [], [], []
        self._active, self._version = None, ORIGINAL
        self._refresh()
        return self

    # ---------------------------------------------------------------------------------- versions
    @property
    def versions(self) -> list[str]:
        """Names of the stored versions, ``"original"`` first."""
        return [ORIGINAL, *self._versions]

    @property
    def version(self) -> str | None:
        """The active version's name (None while interpolating)."""
        return self._version

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
            raise BendingError(f"the new version has entries the wrapped model lacks: {_short(extra)}")
        return {k: state[k].detach().clone().to(device=v.device, dtype=v.dtype) for k, v in reference.items()}

    def create_version(self, name: str, source: nn.Module | Mapping[str, torch.Tensor] | None = None) -> Inspector:
        """Store a new version: a snapshot of the current (bent) weights, or of ``source``'s weights.

        Raises:
            BendingError: the name exists (use :meth:`write` to overwrite) or ``source`` has another
                state-dict layout.
        """
        self._check_version_name(name)
        if name in self._versions:
            raise BendingError(f"version {name!r} already exists; use write({name!r}) to overwrite it")
        self._versions[name] = self._snapshot_of(source)
        return self

    def write(self, name: str) -> Inspector:
        """Save the current (bent) weights as version ``name``, creating or overwriting it."""
        self._check_version_name(name)
        self._versions[name] = self._snapshot_of(None)
        return self

    def _require_version(self, name: str) -> dict[str, torch.Tensor]:
        if name == ORIGINAL:
            return self._original_state()
        if name not in self._versions:
            raise BendingError(f"unknown version {name!r}; known versions: {', '.join(self.versions)}")
        return self._versions[name]

    def _activate(self, weights: dict[str, torch.Tensor] | None, name: str | None) -> Callable[[], None]:
        previous = (self._active, self._version)
        self._active, self._version = weights, name
        self._refresh()

        def undo() -> None:
            self._active, self._version = previous
            self._refresh()

        return undo

    def set_version(self, name: str = ORIGINAL) -> _Restore:
        """Make version ``name`` the weights that bends apply to.

        The change takes effect at once; used as ``with inspector.set_version(name):`` it is undone on exit.
        """
        weights = self._require_version(name)
        return _Restore(self._activate(None if name == ORIGINAL else dict(weights), name))

    @contextlib.contextmanager
    def interpolate(self, coefficients: Mapping[str, float]) -> Iterator[Inspector]:
        """Within the block, weights are ``sum_i c_i * version_i`` (bends still apply on top).

        Non-floating entries (such as BatchNorm's ``num_batches_tracked``) come from the version with the
        largest coefficient. The previous weights are restored on exit, also after an exception.

        Args:
            coefficients: version name -> coefficient, e.g. ``{"a": 0.3, "b": 0.7}``.
        """
        if not isinstance(coefficients, Mapping) or not coefficients:
            raise BendingError(f"interpolate needs a non-empty mapping version -> coefficient, got {coefficients!r}")
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
        undo = self._activate(mixed, None)
        try:
            yield self
        finally:
            undo()


def _call_with(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    """``module(*args, **kwargs)`` with ``params`` substituted for its own tensors (none: plain call)."""
    return functional_call(module, params, args, kwargs) if params else module(*args, **kwargs)


def _checked_call(callback: BendingCallback, tensor: torch.Tensor, name: str, kind: str) -> torch.Tensor:
    """``callback(tensor, name)``, raising BendingError if it fails or changes the shape."""
    try:
        out = callback(tensor, name)
    except BendingError as exc:
        raise BendingError(f"{kind} {name!r}: {exc}") from exc
    except Exception as exc:
        raise BendingError(f"{callback!r} fails on {kind} {name!r} of shape {tuple(tensor.shape)}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.shape != tensor.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BendingError(f"{callback!r} changes {kind} {name!r} from shape {tuple(tensor.shape)} to {got}")
    return out


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as exc:
        raise BendingError(f"{pattern!r} is no known name and not a valid regular expression ({exc})") from exc


def _short(names: Sequence[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


#: Alias of :class:`Inspector` (the name used by torchbend).
BendedModule = Inspector
