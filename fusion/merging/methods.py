"""The merge methods for fine-tunes of one base, one tensor at a time.

Every method is a :class:`MergeMethod`: its parameters (names, scopes and defaults as in mergekit),
its input contract (is a base required, how many inputs) and a kernel that merges the tensors of
one weight. Kernels see the base first (when the method uses one) and the other inputs in their
configured order; they are written for float32/float64 on any device and follow mergekit's
numerical conventions, so that the results agree with ``mergekit-yaml`` to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MergeConfigError
from .sparsify import apply_mask, largest_mask, middle_mask, random_mask

__all__ = ["METHODS", "MergeMethod", "ParameterSpec", "get_method"]

REQUIRED = object()
SHARED, INPUT, NON_BASE = "shared", "input", "non_base"


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter of a method: ``scope`` is ``"shared"`` (one value per tensor), ``"input"``
    (one per input model) or ``"non_base"`` (one per input other than the base)."""

    name: str
    kind: type
    scope: str
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MergeInputs:
    """The tensors of one weight: ``tensors[0]`` is the base when ``has_base``."""

    tensors: Sequence[torch.Tensor]
    has_base: bool
    shared: Mapping[str, Any]
    per_input: Sequence[Mapping[str, Any]]
    generator: torch.Generator | None = None

    def values(self, name: str) -> list[Any]:
        """The per-input values of ``name`` for the inputs other than the base, in order."""
        start = 1 if self.has_base else 0
        return [params[name] for params in self.per_input[start:]]


Kernel = Callable[[MergeInputs], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: name, paper, contract and kernel."""

    name: str
    title: str
    paper: str
    base: str  # "required" or "ignored"
    min_inputs: int
    max_inputs: int | None
    parameters: tuple[ParameterSpec, ...]
    kernel: Kernel

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def parameter(self, name: str) -> ParameterSpec | None:
        return next((p for p in self.parameters if p.name == name), None)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def linear(inputs: MergeInputs) -> torch.Tensor:
    """Weighted average of the inputs (Wortsman et al. 2022, "Model soups", arXiv:2203.05482).

    With ``normalize`` (default) the weights are divided by their sum; the base takes part only if
    it is listed among the models.
    """
    first = inputs.tensors[0]
    if not first.is_floating_point():
        raise MergeConfigError("linear merging needs floating-point tensors")
    dtype = _work_dtype(first)
    weights = [float(p["weight"]) for p in inputs.per_input]
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, weight in zip(inputs.tensors, weights):
        result.add_(tensor.to(dtype), alpha=weight)
    if inputs.shared["normalize"]:
        total = torch.tensor(weights, dtype=dtype).sum()
        if total == 0:
            raise MergeConfigError("linear merge with normalize: the weights sum to 0")
        result.div_(total.to(first.device))
    return result.to(first.dtype)


_DOT_THRESHOLD = 0.9995
_NORM_EPS = 1e-8


def slerp(inputs: MergeInputs) -> torch.Tensor:
    """Spherical linear interpolation from the base (``t=0``) to the other model (``t=1``)
    (Shoemake 1985, "Animating rotation with quaternion curves", SIGGRAPH).

    The whole tensor is one vector; nearly collinear or antipodal pairs (``|cos| > 0.9995``) and
    zero vectors fall back to linear interpolation.
    """
    v0, v1 = inputs.tensors
    if not v0.is_floating_point():
        raise MergeConfigError("slerp needs floating-point tensors")
    dtype = _work_dtype(v0)
    t = torch.tensor(float(inputs.shared["t"]), dtype=dtype, device=v0.device)
    a, b = v0.reshape(-1).to(dtype), v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > _NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > _NORM_EPS, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > _DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        coef_a = torch.sin((1 - t) * theta) / torch.sin(theta)
        coef_b = torch.sin(t * theta) / torch.sin(theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)


def model_stock(inputs: MergeInputs) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
    arXiv:2403.19522): move from the base towards the average of the fine-tunes by
    ``t = N cos / (1 + (N - 1) cos)``, ``cos`` the mean pairwise cosine of their task vectors.

    ``filter_wise`` computes one ``t`` per output row instead of one per tensor; where the
    denominator vanishes the base is kept.
    """
    base, *others = inputs.tensors
    shape = base.shape
    if inputs.shared["filter_wise"]:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in others]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in others]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), count * cos / torch.where(singular, torch.ones_like(cos), denominator))
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(shape)


def _task_vector_kernel(consensus: bool, sparsify: str | None) -> Kernel:
    """A kernel of the task-vector family: sparsify each task vector, weight it, optionally elect
    a sign per entry (TIES' sum rule) and keep only agreeing entries, sum, normalise, scale.

    Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): no sparsification, no election. TIES
    (Yadav et al. 2023, arXiv:2306.01708): keep the largest ``density``, elect signs. DARE (Yu et al.
    2024, arXiv:2311.03099): drop at random, rescale; linear or with TIES' election. Model
    Breadcrumbs (Davari & Belilovsky 2024, arXiv:2312.06795): drop the ``gamma`` largest and the
    smallest entries.
    """

    def kernel(inputs: MergeInputs) -> torch.Tensor:
        base, *others = inputs.tensors
        if not others:
            return base
        shared = inputs.shared
        densities, weights = inputs.values("density"), inputs.values("weight")
        gammas = inputs.values("gamma") if sparsify == "middle" else [0.0] * len(others)
        deltas = base.new_empty((len(others), *base.shape))
        for i, (tensor, density, gamma) in enumerate(zip(others, densities, gammas)):
            delta = torch.sub(tensor, base, out=deltas[i])
            if sparsify == "largest":
                apply_mask(delta, largest_mask(delta, density), shared["rescale"])
            elif sparsify == "random":
                apply_mask(delta, random_mask(delta, density, inputs.generator), shared["rescale"])
            elif sparsify == "middle":
                apply_mask(delta, middle_mask(delta, density, gamma), shared["rescale"])
        weight = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
        deltas.mul_(weight.reshape(-1, *([1] * base.dim())))
        if consensus:
            positive = deltas.sum(dim=0) >= 0  # the elected sign per entry (TIES' "sum" rule)
            mixed, divisor = torch.zeros_like(base), torch.zeros_like(base)
            for i in range(len(others)):  # in place: deltas are not needed afterwards
                agrees = torch.where(positive, deltas[i] > 0, deltas[i] < 0)
                mixed.add_(deltas[i].mul_(agrees))
                divisor.add_(agrees, alpha=weight[i].item())
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weight.sum()
            if divisor.abs() < 1e-8:
                divisor = torch.ones_like(divisor)
        del deltas
        if shared["normalize"]:
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        return mixed.add_(base).to(base.dtype)

    return kernel


def passthrough(inputs: MergeInputs) -> torch.Tensor:
    """Copy the one input, optionally multiplied by ``scale`` (layer stacking, "frankenmerges")."""
    (tensor,) = inputs.tensors
    scale = inputs.per_input[0].get("scale")
    return tensor if scale is None else tensor * scale


def _task_vector_parameters(normalize: bool, rescale: bool, gamma: bool = False) -> tuple[ParameterSpec, ...]:
    params = (
        ParameterSpec("int8_mask", bool, SHARED, False),
        ParameterSpec("normalize", bool, SHARED, normalize),
        ParameterSpec("rescale", bool, SHARED, rescale),
        ParameterSpec("lambda", float, SHARED, 1.0),
        ParameterSpec("weight", float, NON_BASE),
        ParameterSpec("density", float, NON_BASE, 1.0),
    )
    return params + ((ParameterSpec("gamma", float, NON_BASE, 0.01),) if gamma else ())


def _task_vector_method(name: str, title: str, paper: str, consensus: bool, sparsify: str | None,
                        normalize: bool, rescale: bool) -> MergeMethod:
    return MergeMethod(name, title, paper, "required", 1, None,
                       _task_vector_parameters(normalize, rescale, gamma=sparsify == "middle"),
                       _task_vector_kernel(consensus, sparsify))


_TA = "Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089"
_TIES = "Yadav et al. 2023, TIES-Merging: resolving interference when merging models, arXiv:2306.01708"
_DARE = "Yu et al. 2024, Language models are Super Mario: absorbing abilities from homologous models, arXiv:2311.03099"
_CRUMBS = "Davari & Belilovsky 2024, Model Breadcrumbs: scaling multi-task model merging with sparse masks, arXiv:2312.06795"

METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("linear", "Linear", "Wortsman et al. 2022, Model soups, arXiv:2203.05482", "ignored", 1, None,
                (ParameterSpec("weight", float, INPUT), ParameterSpec("normalize", bool, SHARED, True)), linear),
    MergeMethod("slerp", "SLERP", "Shoemake 1985, Animating rotation with quaternion curves", "required", 2, 2,
                (ParameterSpec("t", float, SHARED),), slerp),
    MergeMethod("model_stock", "Model Stock", "Jang et al. 2024, Model Stock, arXiv:2403.19522", "required", 3, None,
                (ParameterSpec("filter_wise", bool, SHARED, False),), model_stock),
    MergeMethod("passthrough", "Passthrough", "layer stacking (no paper; mergekit's frankenmerges)", "ignored", 1, 1,
                (ParameterSpec("scale", float, INPUT, None),), passthrough),
    _task_vector_method("task_arithmetic", "Task Arithmetic", _TA, False, None, False, False),
    _task_vector_method("ties", "TIES", _TIES, True, "largest", True, False),
    _task_vector_method("dare_ties", "DARE TIES", _DARE, True, "random", False, True),
    _task_vector_method("dare_linear", "Linear DARE", _DARE, False, "random", False, True),
    _task_vector_method("breadcrumbs", "Model Breadcrumbs", _CRUMBS, False, "middle", False, False),
    _task_vector_method("breadcrumbs_ties", "Model Breadcrumbs with TIES", _CRUMBS, True, "middle", False, False),
)}


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; a :class:`~fusion.errors.MergeConfigError` lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise MergeConfigError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None

