"""Repairing the activation statistics of merged models: BatchNorm reset and REPAIR.

Averaging the weights of two networks, even after aligning their neurons, shrinks the variance
of the hidden activations ("variance collapse"), which is a main cause of the loss barrier between
them. Two fixes, both computed from a pass over calibration data:

* :func:`reset_bn_stats`: recompute every BatchNorm's running mean and variance on the data
  (Ainsworth et al. 2023, "Git Re-Basin"); the stored statistics of an averaged model are wrong.
* :func:`repair`: REPAIR (Jordan et al. 2023, "REPAIR: REnormalizing Permuted Activations for
  Interpolation Repair"): give each neuron of the merged model the mean and standard deviation
  that the endpoints' corresponding neurons have, mixed with the interpolation weights, by an
  exact per-channel affine correction of the layer producing it (a BatchNorm's affine parameters
  and statistics, or a Linear/Conv layer's weight rows and bias).

Statistics are streamed per channel in float64 (Chan et al.'s parallel variance update), so
memory is O(width) whatever the size of the data.

Example:
    >>> midpoint = interpolate(model_a, model_b, 0.5)
    >>> repaired = repair(midpoint, [model_a, model_b], calibration_loader)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..align.stats import is_transposed_linear
from ..checks import (
    check_models,
    check_weights,
    eval_mode,
    iter_batches,
    model_device,
    move_inputs,
    run_model,
)
from ..errors import DataError
from ..progress import tqdm

__all__ = ["ChannelStats", "neuron_statistics", "repair", "repair_locations", "reset_bn_stats"]

logger = logging.getLogger(__name__)

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Standard deviations below this are treated as a dead (constant) channel that cannot be rescaled.
_DEAD_STD = 1e-12


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one layer's activations over a data set.

    Attributes:
        mean: ``(C,)`` float64 mean over samples (and spatial positions).
        var: ``(C,)`` float64 population variance (divided by ``count``).
        count: values per channel that were averaged (samples times spatial positions).
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: int

    @property
    def std(self) -> torch.Tensor:
        """``(C,)`` population standard deviation."""
        return self.var.clamp_min(0).sqrt()

    @property
    def unbiased_var(self) -> torch.Tensor:
        """``(C,)`` variance divided by ``count - 1`` (as BatchNorm stores it)."""
        return self.var * (self.count / (self.count - 1)) if self.count > 1 else self.var


class _ChannelMoments:
    """Running per-channel count, mean and sum of squared deviations, merged batch by batch."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor, channel_dim: int) -> None:
        values = x.detach().to(torch.float64).movedim(channel_dim, -1)
        values = values.reshape(-1, values.shape[-1])  # (n, C)
        n = values.shape[0]
        if n == 0:
            return
        mean = values.mean(0)
        m2 = ((values - mean) ** 2).sum(0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if mean.shape != self.mean.shape:
            raise DataError(f"the number of channels changed between batches: {mean.shape[0]} after {self.mean.shape[0]}")
        total = self.count + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def result(self) -> ChannelStats:
        assert self.mean is not None and self.m2 is not None, "no values were accumulated"
        return ChannelStats(mean=self.mean, var=self.m2 / self.count, count=self.count)


def _channel_dim(module: nn.Module) -> int:
    """Axis of the channels in the module's output: last for Linear (also Hugging Face's transposed
    ``Conv1D``) and LayerNorm/RMSNorm, 1 for convolutions and BatchNorm."""
    return -1 if isinstance(module, nn.Linear) or is_transposed_linear(module) or _is_affine_norm(module) else 1


def _is_affine_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm (torch's or a library's ``*RMSNorm``) over the last axis with a per-channel scale."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _is_producer(module: nn.Module) -> bool:
    return isinstance(module, _PRODUCERS) or is_transposed_linear(module) or _is_affine_norm(module)


def _check_num_batches(num_batches: int | None) -> None:
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise DataError(f"num_batches must be a positive integer or None, got {num_batches!r}")


def _batches(data: Any, num_batches: int | None, progress: bool, desc: str) -> Iterator[Any]:
    """The inputs of the first ``num_batches`` batches of ``data`` (all if None)."""
    bar = tqdm(iter_batches(data), desc=desc, disable=not progress, leave=False)
    for index, (inputs, _) in enumerate(bar):
        if num_batches is not None and index >= num_batches:
            break
        yield inputs


class _StopForward(Exception):
    """Raised by a hook to skip the rest of a forward pass once the needed activation is seen."""


def _measure(
    model: nn.Module,
    data: Any,
    taps: dict[str, str],
    num_batches: int | None = None,
    progress: bool = False,
    stop_at: str | None = None,
) -> dict[str, ChannelStats]:
    """Per-channel statistics of the ``"input"`` or ``"output"`` of named modules, in eval mode.

    Args:
        taps: module name -> ``"input"`` (first positional input) or ``"output"``.
        stop_at: abandon each forward pass once this module's tap has been read (it must be the
            last tap reached).
    """
    modules = dict(model.named_modules())
    moments = {name: _ChannelMoments() for name in taps}
    handles = []

    def make_hook(name: str, where: str) -> Any:
        dim = _channel_dim(modules[name])

        def hook(module: nn.Module, args: tuple, output: Any = None) -> None:
            moments[name].update(args[0] if where == "input" else output, dim)
            if name == stop_at:
                raise _StopForward

        return hook

    for name, where in taps.items():
        hook = make_hook(name, where)
        handles.append(
            modules[name].register_forward_pre_hook(hook) if where == "input" else modules[name].register_forward_hook(hook)
        )
    device = model_device(model)
    try:
        with eval_mode(model), torch.no_grad():
            for inputs in _batches(data, num_batches, progress, "statistics"):
                try:
                    run_model(model, move_inputs(inputs, device), "data")
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, m in moments.items() if m.count == 0]
    if missing:
        raise DataError(f"the layers {missing} were never reached by a forward pass over the data")
    return {name: m.result() for name, m in moments.items()}


def neuron_statistics(
    model: nn.Module,
    data: Any,
    layers: Sequence[str],
    num_batches: int | None = None,
    progress: bool = False,
    inputs: bool = False,
) -> dict[str, ChannelStats]:
    """Per-channel mean and variance of the outputs (or inputs) of named layers over ``data``.

    The model runs in eval mode without gradients; the channel axis is the last for Linear layers
    and axis 1 otherwise; all other axes (batch, spatial, sequence) are averaged over.

    Args:
        model: the model.
        data: DataLoader or iterable of batches (labels are ignored).
        layers: module names as in ``model.named_modules()``.
        num_batches: use only the first batches.
        progress: show a progress bar.
        inputs: measure each layer's first input instead of its output.

    Returns:
        ``{layer: ChannelStats}``.

    Raises:
        DataError: unknown layer, empty data, or a layer not reached by the forward pass.
    """
    _check_num_batches(num_batches)
    _check_layer_names(model, layers)
    return _measure(model, data, dict.fromkeys(layers, "input" if inputs else "output"), num_batches, progress)


def _check_layer_names(model: nn.Module, layers: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise DataError(f"the model has no layers named {unknown}; known: {list(modules)[1:8]}...")


def reset_bn_stats(
    model: nn.Module,
    data: Any,
    num_batches: int | None = None,
    progress: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``data``.

    BatchNorm layers run in train mode (normalising with batch statistics, as during training)
    and every other module in eval mode (dropout off), without gradients. Each BatchNorm's
    ``running_mean`` and ``running_var`` become the exact mean and unbiased variance of its input
    over all samples seen (sample-weighted, so a smaller last batch counts for what it holds), and
    ``num_batches_tracked`` the number of batches. BatchNorm layers without running statistics
    are left alone; momentum and train/eval modes are unchanged afterwards.

    Args:
        model: the model (copied unless ``inplace``).
        data: DataLoader or iterable of batches (labels are ignored).
        num_batches: use only the first batches (all by default).
        progress: show a progress bar.
        inplace: update ``model`` itself.

    Returns:
        The model with recomputed statistics (the same object if ``inplace``).

    Raises:
        DataError: empty data or bad ``num_batches``.
        NonFiniteWeightsError: the model holds NaN/inf.
    """
    _check_num_batches(num_batches)
    check_models([model], names=["model"])
    model = model if inplace else copy.deepcopy(model)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
    if not norms:
        logger.info("reset_bn_stats: the model has no BatchNorm layers with running statistics")
        return model
    moments = {name: _ChannelMoments() for name in norms}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: moments[name].update(args[0], 1))
        for name, m in norms.items()
    ]
    device, seen = model_device(model), 0
    try:
        with eval_mode(model), torch.no_grad():
            for m in norms.values():
                m.train()
            for inputs in _batches(data, num_batches, progress, "reset_bn_stats"):
                run_model(model, move_inputs(inputs, device), "data")
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    for name, m in norms.items():
        if moments[name].count == 0:
            logger.warning("reset_bn_stats: %s was not used by the forward pass; its statistics are unchanged", name)
            continue
        stats = moments[name].result()
        m.running_mean.copy_(stats.mean)
        m.running_var.copy_(stats.unbiased_var)
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(seen)
    return model


def _call_counts(model: nn.Module, data: Any) -> dict[str, int]:
    """How often each module is called in one forward pass on the first batch, in order of first call."""
    counts: dict[str, int] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
        for name, m in model.named_modules()
        if name
    ]
    try:
        with eval_mode(model), torch.no_grad():
            inputs = next(_batches(data, 1, False, "probe"))
            run_model(model, move_inputs(inputs, model_device(model)), "data")
    finally:
        for handle in handles:
            handle.remove()
    return counts


def repair_locations(model: nn.Module, data: Any, layers: Sequence[str] | None = None) -> list[str]:
    """The layers :func:`repair` corrects, in forward execution order.

    By default: every BatchNorm with running statistics if the model has any, otherwise every
    Linear/Conv layer except the last one executed (the output layer) and every LayerNorm/RMSNorm
    with a per-channel scale (REPAIR for transformers: their affine maps are corrected like a
    Linear layer's rows). Layers called more than
    once per forward pass (shared weights) are left out, since one correction cannot serve two
    different activation distributions.

    Args:
        model: the model.
        data: batches; one forward pass on the first batch gives the execution order.
        layers: names of BatchNorm/Linear/Conv layers to use instead of the default choice.

    Raises:
        DataError: an unknown or unsupported layer in ``layers``, or empty data.
    """
    modules = dict(model.named_modules())
    counts = _call_counts(model, data)
    if layers is not None:
        _check_layer_names(model, layers)
        bad = [name for name in layers if not (isinstance(modules[name], _BatchNorm) or _is_producer(modules[name]))]
        if bad:
            raise DataError(f"repair corrects BatchNorm, Linear and Conv layers and LayerNorm/RMSNorm only; {bad} are "
                            f"not such layers")
        chosen = [name for name in counts if name in set(layers)]
        unreached = [name for name in layers if name not in counts]
        if unreached:
            raise DataError(f"the layers {unreached} are not used by the model's forward pass")
    else:
        norms = [n for n in counts if isinstance(modules[n], _BatchNorm) and modules[n].track_running_stats]
        linear = [n for n in counts if isinstance(modules[n], _PRODUCERS) or is_transposed_linear(modules[n])]
        # transformers: the hidden Linear layers and every LayerNorm/RMSNorm (its affine map is
        # corrected like a Linear layer's rows), in execution order
        chosen = norms if norms else [n for n in counts if (n in linear[:-1]) or _is_affine_norm(modules[n])]
    shared = [name for name in chosen if counts[name] > 1]
    if shared:
        logger.warning("repair: leaving out %s, called more than once per forward pass", shared)
    return [name for name in chosen if counts[name] == 1]


def _targets(
    models: Sequence[nn.Module], weights: Sequence[float], data: Any, locations: Sequence[str],
    num_batches: int | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per location, the weighted mix of the endpoints' output means and standard deviations."""
    mixed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for model, w in zip(models, weights):
        stats = _measure(model, data, dict.fromkeys(locations, "output"), num_batches)
        for name, s in stats.items():
            mean, std = mixed.get(name, (0.0, 0.0))
            mixed[name] = (mean + w * s.mean, std + w * s.std)
    return mixed


def _correct_producer(layer: nn.Module, stats: ChannelStats, goal_mean: torch.Tensor, goal_std: torch.Tensor) -> None:
    """Rescale the output rows of a Linear/Conv layer (the scale of a LayerNorm/RMSNorm) and shift its
    bias to hit the goal statistics."""
    std = stats.std
    alive = std > _DEAD_STD
    scale = torch.where(alive, goal_std / std.clamp_min(_DEAD_STD), torch.ones_like(std))  # (C,)
    weight = layer.weight.data
    shape = (1, -1) if is_transposed_linear(layer) else (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_((weight.double() * scale.view(shape)).to(weight.dtype))
    if getattr(layer, "bias", None) is None:
        logger.warning("repair: %s has no bias, so only its standard deviations can be matched", layer)
        return
    bias = layer.bias.data
    bias.copy_((scale * (bias.double() - stats.mean) + goal_mean).to(bias.dtype))


def _correct_batchnorm(norm: _BatchNorm, stats: ChannelStats, goal_mean: torch.Tensor, goal_std: torch.Tensor) -> None:
    """Set a BatchNorm's statistics and affine map so its eval-mode output has the goal statistics.

    With input statistics ``(m, s)``, the BatchNorm computes ``a * (x - m) + goal_mean`` with
    ``a = sign(gamma) * goal_std / s``: running stats ``(m, unbiased var)``, weight ``a * sqrt(rv + eps)``,
    bias ``goal_mean``. Without affine parameters the running statistics alone encode the map.
    """
    std, eps = stats.std, norm.eps
    alive = std > _DEAD_STD
    if norm.affine:
        running_var = stats.unbiased_var
        sign = torch.where(norm.weight.data.double() < 0, -1.0, 1.0).to(std)
        scale = sign * goal_std / std.clamp_min(_DEAD_STD)
        weight = torch.where(alive, scale * (running_var + eps).sqrt(), norm.weight.data.double())
        norm.running_mean.copy_(stats.mean)
        norm.running_var.copy_(running_var)
        norm.weight.data.copy_(weight.to(norm.weight.dtype))
        norm.bias.data.copy_(goal_mean.to(norm.bias.dtype))
        return
    # (x - rm) / sqrt(rv + eps) = goal_std / s * (x - m) + goal_mean
    ratio = std / goal_std.clamp_min(_DEAD_STD)
    running_var = ratio**2 - eps
    feasible = alive & (goal_std > _DEAD_STD) & (running_var >= 0)
    if not bool(feasible.all()):
        logger.warning("repair: %d channel(s) of %s cannot be matched without affine parameters", int((~feasible).sum()), norm)
    norm.running_var.copy_(torch.where(feasible, running_var, norm.running_var.double()))
    norm.running_mean.copy_(torch.where(feasible, stats.mean - goal_mean * ratio, norm.running_mean.double()))


def repair(
    merged: nn.Module,
    models: Sequence[nn.Module],
    data: Any,
    weights: Sequence[float] | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    inplace: bool = False,
    layers: Sequence[str] | None = None,
) -> nn.Module:
    """REPAIR: give each neuron of ``merged`` the endpoints' mixed activation mean and std.

    For every location (see :func:`repair_locations`: the BatchNorm layers, else every hidden
    Linear/Conv layer and LayerNorm/RMSNorm), the per-channel mean ``mu_k`` and standard deviation ``sigma_k`` of each
    endpoint's output are measured on ``data``, and the goal is ``sum_k w_k mu_k`` and
    ``sum_k w_k sigma_k``. Locations are then corrected one at a time in forward order, each
    measured on ``merged`` after the corrections before it, by an exact per-channel affine map:
    a BatchNorm's statistics and affine parameters, or a Linear/Conv layer's weight rows and bias.
    Afterwards each location's eval-mode outputs on ``data`` have the goal mean and std exactly
    (up to float error). Dead channels (zero std) only get their mean corrected.

    Args:
        merged: the merged model, e.g. ``interpolate(model_a, aligned_b, 0.5)`` (copied unless ``inplace``).
        models: the (already aligned) endpoints the merged model was made from, same architecture.
        data: re-iterable calibration batches (a DataLoader or a list; labels are ignored), read
            once per endpoint and once per location. With ``num_batches`` the first batches are
            kept in memory so every pass sees the same samples.
        weights: the endpoints' interpolation weights, non-negative and summing to 1 (default uniform).
        num_batches: use only the first batches of ``data``.
        progress: show a progress bar over the passes.
        inplace: correct ``merged`` itself.
        layers: correct these layers instead of the default locations.

    Returns:
        The repaired model.

    Raises:
        EnsembleError: no endpoints or bad weights.
        ArchitectureMismatchError, DeviceMismatchError, NonFiniteWeightsError: the models disagree or hold NaN/inf.
        DataError: empty data, bad ``num_batches`` or ``layers``.
    """
    _check_num_batches(num_batches)
    if isinstance(models, nn.Module):
        models = [models]
    models = list(models)
    weights = check_weights(weights, len(models))
    check_models([merged, *models], names=["merged", *(f"models[{k}]" for k in range(len(models)))])
    if num_batches is not None:  # the same samples in every pass, even from a shuffling loader
        data = [(inputs, None) for inputs in _batches(data, num_batches, False, "calibration")]
        num_batches = None
    merged = merged if inplace else copy.deepcopy(merged)
    locations = repair_locations(merged, data, layers)
    if not locations:
        logger.warning("repair: the model has no layer to correct")
        return merged
    modules = dict(merged.named_modules())
    with tqdm(total=len(models) + len(locations), desc="repair", disable=not progress) as bar:
        goals = _targets(models, weights, data, locations, num_batches)
        bar.update(len(models))
        for name in locations:
            layer = modules[name]
            is_norm = isinstance(layer, _BatchNorm)
            stats = _measure(merged, data, {name: "input" if is_norm else "output"}, num_batches, stop_at=name)[name]
            goal_mean, goal_std = goals[name]
            with torch.no_grad():
                (_correct_batchnorm if is_norm else _correct_producer)(layer, stats, goal_mean, goal_std)
            bar.update(1)
    return merged
