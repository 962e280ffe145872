"""Streamed activation statistics of permutation groups, O(width^2) memory per group.

Model A and model B run on the same batches; at each group's capture site the activations of
its units are gathered and folded into running moments (:class:`~fusion.moments.CrossMoments`
with per-unit variances and the full cross-covariance), so the memory is independent of the
data-set size. From them come means, standard deviations, cross-correlations (activation
matching) and squared distances (optimal transport on activations).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import eval_mode, iter_batches, model_device, move_inputs, run_model
from ..moments import CrossMoments
from ..progress import tqdm
from ..spec import AxisMember, PermutationGroup, PermutationSpec

__all__ = ["CaptureSite", "PairStats", "capture_site", "capture_units", "collect_pair_stats", "sites_for"]


class PairStats(CrossMoments):
    """Streamed moments of two sets of units observed on the same samples: per-unit means and
    variances, and the (size_a, size_b) cross-covariance (a diagonal :class:`CrossMoments`).

    Args:
        size_a, size_b: the number of units on each side.
    """

    def __init__(self, size_a: int, size_b: int):
        super().__init__(diagonal=True)
        self.size_a, self.size_b = size_a, size_b

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Fold in samples ``a`` (n, size_a) and ``b`` (n, size_b) observed on the same inputs."""
        super().update(a.detach().cpu(), b.detach().cpu())

    @property
    def mean_a(self) -> torch.Tensor:
        return self.mean_x

    @property
    def mean_b(self) -> torch.Tensor:
        return self.mean_y

    @property
    def std_a(self) -> torch.Tensor:
        return (self.sxx / self.count).clamp_min(0).sqrt()

    @property
    def std_b(self) -> torch.Tensor:
        return (self.syy / self.count).clamp_min(0).sqrt()

    def correlation(self, rtol: float = 1e-4) -> torch.Tensor:
        """(size_a, size_b) Pearson correlation of every pair of units.

        Units that are constant up to float noise (standard deviation below ``rtol`` times their
        mean magnitude, or below 1e-6 of the group's largest) get correlation 0 with everything.
        """
        covariance = self.sxy / self.count

        def live(std: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
            floor = torch.maximum(rtol * mean.abs(), 1e-6 * std.max().clamp_min(1e-30) * torch.ones_like(std))
            return std > floor

        live_a, live_b = live(self.std_a, self.mean_a), live(self.std_b, self.mean_b)
        scale = torch.outer(torch.where(live_a, self.std_a, 1.0), torch.where(live_b, self.std_b, 1.0))
        return torch.where(torch.outer(live_a, live_b), covariance / scale, 0.0)

    def squared_distance(self) -> torch.Tensor:
        """(size_a, size_b) mean squared difference E[(a_i - b_j)^2] of every pair of units."""
        var_a, var_b = self.sxx / self.count, self.syy / self.count
        gap = self.mean_a[:, None] - self.mean_b[None, :]
        return (var_a[:, None] + var_b[None, :] + gap**2 - 2 * self.sxy / self.count).clamp_min(0)


@dataclass(frozen=True)
class CaptureSite:
    """Where a group's units can be observed: a module's input or output, and the positions."""

    module: str
    on_input: bool
    channel_dim: int  # dimension of the captured tensor holding the channels
    member: AxisMember  # its index gives the units' positions along that dimension


def capture_site(group: PermutationGroup, modules: dict[str, nn.Module]) -> CaptureSite | None:
    """A place where the group's units are visible as activations (None for attention-internal groups).

    Prefers the input of the first consumer (a Linear, an ungrouped convolution or an attention
    layer), i.e. the units after their nonlinearity; falls back to the output of a layer.
    """
    if group.kind != "channels":
        return None  # heads and within-head dims: their units are not separately observable
    by_name = {m.name: m for m in group.members}
    for consumer in group.consumers:
        module = modules.get(consumer)
        weight = by_name.get(f"{consumer}.weight")
        if weight is not None and weight.axis == 0 and is_transposed_linear(module):
            return CaptureSite(consumer, True, -1, weight)
        if weight is None or weight.axis != 1:
            continue
        if isinstance(module, nn.Linear):
            return CaptureSite(consumer, True, -1, weight)
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1 \
                and not isinstance(module, nn.modules.conv._ConvTransposeNd):
            return CaptureSite(consumer, True, 1, weight)
    for member in group.members:
        name, local = member.name.rsplit(".", 1) if "." in member.name else ("", member.name)
        module = modules.get(name)
        if local == "weight" and member.axis == 1 and member.block == 1 and is_transposed_linear(module):
            return CaptureSite(name, False, -1, member)
        if local != "weight" or member.axis != 0 or member.block != 1:
            continue
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            return CaptureSite(name, False, -1, member)
        if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and not \
                isinstance(module, nn.modules.conv._ConvTransposeNd):
            return CaptureSite(name, False, 1, member)
    return None


def is_transposed_linear(module: nn.Module | None) -> bool:
    """Whether ``module`` is a linear layer storing its weight as (in, out): Hugging Face's
    ``Conv1D`` (GPT-2 and relatives), recognised without importing ``transformers``."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
        and getattr(module, "nf", None) == weight.shape[1]


def _units_of(tensor: torch.Tensor, site: CaptureSite) -> torch.Tensor:
    """(samples, size) activations of the site's units; block positions count as extra samples."""
    channels = tensor.movedim(site.channel_dim, -1)
    flat = channels.reshape(-1, channels.shape[-1])
    index = site.member.index.to(flat.device)  # (size, block)
    picked = flat[:, index.reshape(-1)].reshape(flat.shape[0], index.shape[0], index.shape[1])
    return picked.permute(0, 2, 1).reshape(-1, index.shape[0])


def _hook(store: dict[str, torch.Tensor], name: str, site: CaptureSite) -> Any:
    if site.on_input:
        def on_input(module: nn.Module, args: tuple) -> None:
            store[name] = _units_of(args[0], site)

        return on_input

    def on_output(module: nn.Module, args: tuple, output: Any) -> None:
        store[name] = _units_of(output[0] if isinstance(output, tuple) else output, site)

    return on_output


@contextmanager
def capture_units(model: nn.Module, sites: dict[str, CaptureSite]) -> Iterator[dict[str, torch.Tensor]]:
    """Register hooks storing each site's unit activations, (samples, size), of the last forward."""
    store: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for name, site in sites.items():
        module = modules[site.module]
        register = module.register_forward_pre_hook if site.on_input else module.register_forward_hook
        handles.append(register(_hook(store, name, site)))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def collect_pair_stats(
    model_a: nn.Module,
    model_b: nn.Module,
    sites_a: dict[str, CaptureSite],
    sites_b: dict[str, CaptureSite],
    data: Any,
    progress: bool = True,
    desc: str = "activation statistics",
) -> dict[str, PairStats]:
    """Run both models over ``data`` (eval mode, no grad) and stream the statistics of each group.

    ``sites_a`` and ``sites_b`` map the same group names to capture sites in each model.
    """
    device = model_device(model_a)
    stats: dict[str, PairStats] = {}
    with torch.no_grad(), eval_mode(model_a), eval_mode(model_b), \
            capture_units(model_a, sites_a) as store_a, capture_units(model_b, sites_b) as store_b:
        for inputs, _ in tqdm(iter_batches(data), desc=desc, disable=not progress, leave=False):
            inputs = move_inputs(inputs, device)
            run_model(model_a, inputs, "data")
            run_model(model_b, inputs, "data")
            for name in sites_a:
                a, b = store_a[name], store_b[name]
                if name not in stats:
                    stats[name] = PairStats(a.shape[1], b.shape[1])
                stats[name].update(a, b)
    return stats


def sites_for(spec: PermutationSpec, model: nn.Module) -> tuple[dict[str, CaptureSite], list[str]]:
    """Capture sites of every group of ``spec`` in ``model``, and the groups that have none."""
    modules = dict(model.named_modules())
    sites, missing = {}, []
    for group in spec.groups:
        site = capture_site(group, modules)
        if site is None:
            missing.append(group.name)
        else:
            sites[group.name] = site
    return sites, missing
