"""Model stitching: run model A up to a layer, map its representation with a stitching layer, finish in model B.

Stitching (Lenc & Vedaldi, "Understanding image representations by measuring their equivariance and
equivalence", CVPR 2015; Bansal, Nakkiran & Barak, "Revisiting model stitching to compare neural
representations", NeurIPS 2021) tests whether two networks' representations are interchangeable up to
a simple map. :func:`stitch` cuts the two torch.fx graphs: A's graph is truncated so that it returns the
chosen node, B's graph gets a new input in place of its chosen node. The stitching layer maps channels
(a 1x1 convolution for feature maps, a linear map for vectors) and is one of

* ``"linear"``: affine map fitted by least squares;
* ``"procrustes"``: orthogonal (semi-orthogonal for unequal widths) map with shift and optional scale,
  fitted by orthogonal Procrustes (Schonemann, 1966);
* ``"lowrank"``: rank-r affine map fitted by reduced-rank regression (Izenman, 1975).

:func:`fit_stitch` fits the layer in closed form from streamed sufficient statistics (means and
cross-covariances, :class:`~fusion.moments.CrossMoments`) so memory does not grow with the
data set, then optionally fine-tunes only the stitching layer by gradient descent. The stitching layers
are the regressable layers of :mod:`fusion.layers` (:class:`~fusion.layers.RegressableLinear`,
:class:`~fusion.layers.ProcrustesLinear`, :class:`~fusion.layers.LowRankLinear`) acting on the channel
dimension.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..checks import (
    check_same_device,
    describe_shapes,
    eval_mode,
    iter_batches,
    model_device,
    move_inputs,
    run_model,
)
from ..errors import DataError, ExampleInputError, StitchError, TraceError
from ..layers import LowRankLinear, ProcrustesLinear, RegressableLinear
from ..moments import CrossMoments
from ..progress import tqdm
from ..tracking import active_tracker
from .capture import TracedModel, trace_model
from .graphs import merge_graph_modules, set_output

__all__ = [
    "STITCH_KINDS",
    "StitchFit",
    "StitchLayer",
    "StitchedModel",
    "cut_points",
    "fit_stitch",
    "make_stitch_layer",
    "stitch",
]

logger = logging.getLogger(__name__)

#: Accepted values of ``stitch=``.
STITCH_KINDS = ("linear", "procrustes", "lowrank")


#: A stitching layer: one of the regressable linear layers of :mod:`fusion.layers`.
StitchLayer = RegressableLinear | ProcrustesLinear | LowRankLinear


def make_stitch_layer(
    kind: str, in_features: int, out_features: int, rank: int | None = None, channel_dim: int = 1, scale: bool = True
) -> StitchLayer:
    """Build an identity-initialised stitching layer of the given kind (a :mod:`fusion.layers` linear layer).

    The identity passes the leading ``min(in, out)`` channels through (zero bias, scale 1), which is the
    "feed A's units straight into B" baseline.

    Raises:
        StitchError: unknown kind, or a rank missing / out of range / given for another kind.
    """
    if kind not in STITCH_KINDS:
        raise StitchError(f"unknown stitch {kind!r}; choose one of {', '.join(STITCH_KINDS)}")
    if kind != "lowrank" and rank is not None:
        raise StitchError(f"rank={rank} only applies to stitch='lowrank', not {kind!r}")
    eye = torch.eye(out_features, in_features)
    if kind == "linear":
        layer: StitchLayer = RegressableLinear(in_features, out_features, channel_dim=channel_dim)
        with torch.no_grad():
            layer.weight.copy_(eye)
    elif kind == "procrustes":
        layer = ProcrustesLinear(in_features, out_features, scale=scale, channel_dim=channel_dim)
        layer.rotation.set_(eye)
    else:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise StitchError(
                f"stitch='lowrank' needs an int rank in 1..{min(in_features, out_features)} "
                f"(widths {in_features} -> {out_features}), got {rank!r}"
            )
        layer = LowRankLinear(in_features, out_features, rank, channel_dim=channel_dim)
        with torch.no_grad():
            layer.down.weight.copy_(torch.eye(rank, in_features))
            layer.up.weight.copy_(torch.eye(out_features, rank))
    with torch.no_grad():
        layer.bias.zero_()
    return layer


@dataclass(frozen=True)
class StitchFit:
    """How a stitching layer was fitted.

    Attributes:
        num_samples: feature rows used for the closed-form fit (inputs x spatial positions).
        explained_variance: fraction of the target representation's variance the fitted map explains
            (1.0 for a perfect fit), measured on the fitting data before fine-tuning.
        finetune_losses: mean training loss of each fine-tuning epoch (empty without fine-tuning).
    """

    num_samples: int
    explained_variance: float
    finetune_losses: tuple[float, ...] = ()


class StitchedModel(nn.Module):
    """A up to ``layer_a``, a stitching layer, then B from ``layer_b`` on, as one merged GraphModule.

    Attributes:
        stitch_layer: the stitching layer (a :mod:`fusion.layers` linear layer); the only trainable part.
        model: the merged GraphModule (:func:`~fusion.inspect.graphs.merge_graph_modules` of the frozen
            copies of A and B and the stitching layer); calling the stitched model calls it.
        front: model A cut at ``layer_a`` (:func:`~fusion.inspect.graphs.set_output`; shares A's modules
            with ``model``).
        target: model B cut at ``layer_b``: what the stitching layer is fitted to reproduce.
        layer_a, layer_b: the layer names as given; node_a, node_b: the fx node names.
        fit_info: a :class:`StitchFit` once :func:`fit_stitch` has run, else None.
    """

    def __init__(
        self,
        stitch_layer: StitchLayer,
        model: fx.GraphModule,
        front: fx.GraphModule,
        target: fx.GraphModule,
        layers: tuple[str, str],
        nodes: tuple[str, str],
    ) -> None:
        super().__init__()
        self.stitch_layer = stitch_layer
        self.model = model
        self._views = (front, target)  # a tuple, so that they are not registered submodules
        self.layer_a, self.layer_b = layers
        self.node_a, self.node_b = nodes
        self.fit_info: StitchFit | None = None

    @property
    def front(self) -> fx.GraphModule:
        """Model A up to ``layer_a``."""
        return self._views[0]

    @property
    def target(self) -> fx.GraphModule:
        """Model B up to ``layer_b``."""
        return self._views[1]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def features(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A's representation at layer_a, B's representation at layer_b)`` for ``inputs``."""
        target = self.target.to(model_device(self.stitch_layer))
        return run_model(self.front, inputs, "data"), run_model(target, inputs, "data")


def _trace(model: nn.Module, argument: str) -> TracedModel:
    try:
        return trace_model(model)
    except TraceError as exc:
        raise StitchError(f"stitching needs a torch.fx graph of {argument}: {exc}") from exc


def _node_of(traced: TracedModel, layer: str, argument: str) -> str:
    if not isinstance(layer, str):
        raise StitchError(f"{argument} must be a layer name (str), got {type(layer).__name__}")
    pairs = traced.resolve(layer, StitchError, argument)
    nodes = list(dict.fromkeys(c for _, c in pairs))
    if len(nodes) != 1:
        raise StitchError(f"{argument}={layer!r} matches {len(nodes)} layers ({', '.join(nodes[:8])}); name exactly one")
    return nodes[0]


def _check_cut(traced: TracedModel, node: str, layer: str) -> None:
    """Raise unless ``node`` cuts model B in two (nothing after it reads anything before it)."""
    if node not in _cut_nodes(traced):
        raise StitchError(
            f"layer_b={layer!r} does not cut model_b in two: layers after it also read what comes before it "
            f"(e.g. a residual connection bypassing it); stitch at a block output instead, see cut_points(model_b)"
        )


def _channel_dim(features: torch.Tensor, channel_dim: int | None) -> int:
    if features.dim() <= 2:
        return -1
    return 1 if channel_dim is None else channel_dim


def _check_features(x: Any, y: Any, layers: tuple[str, str], channel_dim: int | None) -> int:
    for value, layer, argument in ((x, layers[0], "layer_a"), (y, layers[1], "layer_b")):
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            raise StitchError(f"{argument}={layer!r} yields {describe_shapes(value)}; a stitch needs a (N, C, ...) tensor")
    cd = _channel_dim(x, channel_dim)
    if x.dim() != y.dim() or not -x.dim() <= cd < x.dim():
        raise StitchError(
            f"incompatible shapes: layer_a={layers[0]!r} gives {tuple(x.shape)} but layer_b={layers[1]!r} gives "
            f"{tuple(y.shape)}"
        )
    rest_x = [s for d, s in enumerate(x.shape) if d != cd % x.dim()]
    rest_y = [s for d, s in enumerate(y.shape) if d != cd % y.dim()]
    if rest_x != rest_y:
        raise StitchError(
            f"incompatible shapes: layer_a={layers[0]!r} gives {tuple(x.shape)} and layer_b={layers[1]!r} gives "
            f"{tuple(y.shape)}; a stitch maps channels (dim {cd}) and needs all other dimensions equal"
        )
    return cd


def stitch(
    model_a: nn.Module,
    layer_a: str,
    model_b: nn.Module,
    layer_b: str,
    example_inputs: Any,
    stitch: str = "linear",
    rank: int | None = None,
    *,
    scale: bool = True,
    channel_dim: int | None = None,
    data: Any = None,
    **fit_kwargs: Any,
) -> StitchedModel:
    """Build a model running ``model_a`` up to ``layer_a``, a stitching layer, then ``model_b`` from ``layer_b``.

    ``model_a`` and ``model_b`` are deep-copied and never modified; the copies are frozen
    (``requires_grad=False``).

    Args:
        model_a: the model providing the representation.
        layer_a: module name (``"layer2"``, ``"features.3"``) or fx node name in ``model_a``.
        model_b: the model consuming it (may be ``model_a`` itself).
        layer_b: module or node name in ``model_b`` whose output the stitch replaces; it must cut
            ``model_b`` in two (see :func:`cut_points`).
        example_inputs: one batch of inputs, used to check shapes (a tensor, tuple or dict).
        stitch: ``"linear"``, ``"procrustes"`` or ``"lowrank"``.
        rank: the rank of a ``"lowrank"`` stitch.
        scale: let a Procrustes stitch scale (``y = s R x + b``); False keeps ``s = 1``.
        channel_dim: channel dimension of ``(N, C, ...)`` representations (default 1; vectors use the last).
        data: if given, fit the stitch on it right away (:func:`fit_stitch` with ``fit_kwargs``).

    Returns:
        A :class:`StitchedModel` (identity-initialised stitch unless ``data`` is given).

    Raises:
        StitchError: unknown layer, a layer that is not a cut of ``model_b``, incompatible shapes,
            bad ``stitch``/``rank``, or a model torch.fx cannot trace.
    """
    for model, argument in ((model_a, "model_a"), (model_b, "model_b")):
        if not isinstance(model, nn.Module):
            raise StitchError(f"{argument} is a {type(model).__name__}, not an nn.Module")
    if stitch not in STITCH_KINDS:
        raise StitchError(f"unknown stitch {stitch!r}; choose one of {', '.join(STITCH_KINDS)}")
    device = check_same_device([model_a, model_b], ["model_a", "model_b"])
    traced_a = _trace(copy.deepcopy(model_a).requires_grad_(False), "model_a")
    traced_b = _trace(copy.deepcopy(model_b).requires_grad_(False), "model_b")
    node_a = _node_of(traced_a, layer_a, "layer_a")
    node_b = _node_of(traced_b, layer_b, "layer_b")
    _check_cut(traced_b, node_b, layer_b)
    front = set_output(traced_a.graph_module, node_a, error=StitchError)
    target = set_output(traced_b.graph_module, node_b, error=StitchError)
    inputs = move_inputs(example_inputs, device)
    with torch.no_grad(), eval_mode(front), eval_mode(target):
        x = run_model(front, inputs)
        y = run_model(target, inputs)
    cd = _check_features(x, y, (layer_a, layer_b), channel_dim)
    layer = make_stitch_layer(stitch, x.shape[cd], y.shape[cd], rank, cd, scale).to(device=device, dtype=x.dtype)
    merged = merge_graph_modules(
        {"a": traced_a.graph_module, "stitch": layer, "b": traced_b.graph_module},
        {"stitch": f"a.{node_a}", f"b.{node_b}": "stitch"},
        output="b", opaque=("stitch",), class_name="Stitched", error=StitchError,
    )
    stitched = StitchedModel(layer, merged, front, target, (layer_a, layer_b), (node_a, node_b))
    with torch.no_grad(), eval_mode(stitched):
        try:
            run_model(stitched, inputs)
        except ExampleInputError as exc:
            raise StitchError(f"the stitched model {layer_a!r} -> {layer_b!r} fails on example_inputs: {exc}") from exc
    if data is not None:
        fit_stitch(stitched, data, inplace=True, **fit_kwargs)
    return stitched


def _accumulate(stitched: StitchedModel, data: Any, max_batches: int | None, progress: bool) -> CrossMoments:
    moments = CrossMoments()
    device = model_device(stitched.stitch_layer)
    batches = tqdm(iter_batches(data), desc="fit stitch", disable=not progress, leave=False)
    with torch.no_grad(), eval_mode(stitched):
        for k, (inputs, _) in enumerate(batches):
            if max_batches is not None and k >= max_batches:
                break
            x, y = stitched.features(move_inputs(inputs, device))
            stitched.stitch_layer.update_moments(moments, x, y)
    return moments


def _finetune(
    stitched: StitchedModel, data: Any, epochs: int, lr: float, loss: str, max_batches: int | None, progress: bool
) -> list[float]:
    device = model_device(stitched.stitch_layer)
    optimizer = torch.optim.Adam(stitched.stitch_layer.parameters(), lr=lr)
    losses = []
    with eval_mode(stitched):
        for epoch in tqdm(range(epochs), desc="fine-tune stitch", disable=not progress, leave=False):
            total, count = 0.0, 0
            for k, (inputs, targets) in enumerate(iter_batches(data)):
                if max_batches is not None and k >= max_batches:
                    break
                inputs = move_inputs(inputs, device)
                if loss == "activation":
                    with torch.no_grad():
                        x, y = stitched.features(inputs)
                    value = F.mse_loss(stitched.stitch_layer(x), y)
                else:
                    if targets is None:
                        raise DataError("fine-tuning with loss='task' needs (inputs, targets) batches; use loss='activation'")
                    value = F.cross_entropy(run_model(stitched, inputs, "data"), targets.to(device))
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
                total, count = total + float(value.detach()), count + 1
            losses.append(total / max(count, 1))
            active_tracker().log_metrics({"stitch_finetune_loss": losses[-1]}, step=epoch)
            logger.info("stitch fine-tuning epoch %d: loss %.5g", epoch + 1, losses[-1])
    return losses


def fit_stitch(
    stitched: StitchedModel,
    data: Any,
    progress: bool = True,
    finetune_epochs: int = 0,
    lr: float = 1e-3,
    *,
    loss: str = "task",
    ridge: float = 0.0,
    max_batches: int | None = None,
    inplace: bool = False,
) -> StitchedModel:
    """Fit the stitching layer in closed form to map A's representation onto B's, then optionally fine-tune it.

    Streams ``data`` once, accumulating means and (cross-)covariances of A's features at ``layer_a``
    and B's at ``layer_b`` (memory independent of the data-set size), solves for the stitch (least
    squares / Procrustes / reduced-rank regression), and with ``finetune_epochs > 0`` trains only the
    stitching layer with Adam. Models run in eval mode throughout.

    Args:
        stitched: a :class:`StitchedModel` from :func:`stitch`.
        data: DataLoader or iterable of ``(inputs, targets)`` batches (or input tensors), or one tensor.
        progress: show tqdm progress bars.
        finetune_epochs: epochs of gradient fine-tuning of the stitching layer after the closed-form fit (each
            epoch's mean loss also goes to the active MLflow run as ``stitch_finetune_loss``, see :mod:`fusion.tracking`).
        lr: Adam learning rate for fine-tuning.
        loss: fine-tuning objective: ``"task"`` (cross-entropy of the stitched output against the batch
            targets) or ``"activation"`` (MSE to B's representation at ``layer_b``).
        ridge: ridge regularisation, relative to the mean feature variance.
        max_batches: use at most this many batches per pass.
        inplace: fit ``stitched`` itself instead of a copy.

    Returns:
        The fitted model (``stitched`` itself when ``inplace``) with ``fit_info`` set.

    Raises:
        StitchError: ``stitched`` is not a StitchedModel or ``loss`` is unknown.
        DataError: empty data, or ``loss="task"`` fine-tuning without targets.
    """
    if not isinstance(stitched, StitchedModel):
        raise StitchError(f"fit_stitch needs a StitchedModel from stitch(), got {type(stitched).__name__}")
    if loss not in ("task", "activation"):
        raise StitchError(f"loss must be 'task' or 'activation', got {loss!r}")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise StitchError(f"finetune_epochs must be a non-negative int, got {finetune_epochs!r}")
    if not ridge >= 0:
        raise StitchError(f"ridge must be >= 0, got {ridge!r}")
    moments = _accumulate(stitched, data, max_batches, progress)
    if moments.count <= stitched.stitch_layer.in_features:
        logger.warning(
            "fitting a %d-channel stitch on only %d feature rows: the fit is underdetermined and will not "
            "generalise; use more data", stitched.stitch_layer.in_features, moments.count,
        )
    model = stitched if inplace else copy.deepcopy(stitched)
    model.stitch_layer.fit_moments(moments, ridge=ridge)
    explained = model.stitch_layer.explained_variance(moments)
    losses = _finetune(model, data, finetune_epochs, lr, loss, max_batches, progress) if finetune_epochs else []
    model.fit_info = StitchFit(moments.count, explained, tuple(losses))
    logger.info("stitch %s -> %s fitted on %d samples: explained variance %.4f", model.layer_a, model.layer_b,
                moments.count, explained)
    return model


def _cut_nodes(traced: TracedModel) -> set[str]:
    """Names of the nodes after which nothing reads a value computed before them (placeholders excluded)."""
    nodes = [n for n in traced.graph.nodes if n.op not in ("get_attr", "output")]
    index = {n: k for k, n in enumerate(nodes)}
    reach = [min((index[a] for a in n.all_input_nodes if a in index), default=k) for k, n in enumerate(nodes)]
    cuts, lowest = set(), len(nodes)
    for k in range(len(nodes) - 1, -1, -1):
        if lowest >= k and nodes[k].op != "placeholder":
            cuts.add(nodes[k].name)
        lowest = min(lowest, reach[k])
    return cuts


def cut_points(model: nn.Module, unique: bool = True) -> list[str]:
    """Module names at which ``model`` can be cut in two (valid ``layer_b`` values for :func:`stitch`), in order.

    A module's output is a cut point when nothing computed after it reads anything computed before it
    (no connection bypasses it), e.g. the output of a whole residual block but not of a conv inside one.

    Args:
        model: the model (traced with torch.fx; not modified).
        unique: keep one name per graph node, the shallowest module (``"layer1"`` rather than ``"layer1.1"``).

    Returns:
        Module names in execution order.
    """
    traced = _trace(model, "model")
    cuts = _cut_nodes(traced)
    nodes = [n for n in traced.graph.nodes if n.op not in ("get_attr", "output")]
    by_node: dict[str, list[str]] = {}
    for module, node in traced.module_nodes.items():
        if node in cuts:
            by_node.setdefault(node, []).append(module)
    names: list[str] = []
    for node in (n.name for n in nodes if n.name in by_node):
        aliases = by_node[node]
        names.extend([min(aliases, key=lambda a: a.count("."))] if unique else aliases)
    return names

