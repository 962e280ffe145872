"""Structural verification: a permutation symmetry is a property of the architecture, so check it as one.

A group can keep the function of one particular set of weights by accident: random-init
transformers keep attention almost uniform (std-0.02 weights), normalisation layers start at
scale 1 and shift 0, weight-standardised convolutions start with gains of 1, ConvNeXt's layer
scales start at 1e-6. A wrong coupling is then invisible on the model itself and shows only
after training. So every check here runs on a **structural copy**: a float64 deep copy of the
model, in eval mode, whose parameters and normalisation statistics are re-drawn at O(1) scale
(:func:`structural_copy`), on the caller's example inputs and on a fresh random input of the same
structure (:func:`fresh_inputs`).

Tolerance (:data:`STRUCTURAL_TOLERANCE`, 1e-9 relative): float64 rounds at 1.1e-16; re-ordering
the sums of a deep network with O(1) weights moves its output by ~1e-15 relative (measured on
ResNets, DenseNet, RegNet, EfficientNet, ConvNeXt, ViT: 3e-16..9e-16), while a wrong coupling at
O(1) scale moves it by >= 1e-4 (usually 1e-2..1). 1e-9 leaves five orders of magnitude on each side.

The user's model is never touched: the copy is made with :func:`copy.deepcopy`, so not even the
train/eval mode or an internal cache of the original changes. A copy that does not run in
float64 (a model that casts to float32 itself) is checked in the model's own dtype with the
tolerance :data:`FALLBACK_TOLERANCE` of that dtype, with a logged warning. A model that cannot be
deep-copied, or whose re-drawn copy runs in neither dtype or gives non-finite outputs, raises
:class:`~fusion.errors.TraceError`; the spec builder then refuses every group (kind ``"trace"``)
rather than return an unchecked one.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..checks import main_output, split_inputs
from ..errors import TraceError
from .records import AxisMember, PermutationGroup, SkippedGroup

__all__ = [
    "FALLBACK_TOLERANCE",
    "STRUCTURAL_TOLERANCE",
    "fresh_inputs",
    "moving_permutation",
    "relative_difference",
    "structural_copy",
    "structural_difference",
    "verify_groups",
]

log = logging.getLogger(__name__)

#: Relative output difference accepted in float64 on a structural copy (see the module docstring).
STRUCTURAL_TOLERANCE = 1e-9
#: Tolerance in float64 when the model computes parts in float32 itself (Hugging Face RMSNorm).
MIXED_PRECISION_TOLERANCE = 1e-5
#: Tolerance per dtype when the model cannot run in float64 (its own dtype, re-drawn weights).
FALLBACK_TOLERANCE = {torch.float64: STRUCTURAL_TOLERANCE, torch.float32: 1e-4, torch.float16: 2e-2,
                      torch.bfloat16: 2e-2}

_BIAS_WORDS = ("bias", "beta", "shift")
#: Tensors tried per refused group when looking for one that no rule moves.
_MAX_CANDIDATES = 8


def _output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, dict):
        out = list(out.values())
    elif hasattr(out, "to_tuple") and callable(out.to_tuple):  # Hugging Face ModelOutput
        out = list(out.to_tuple())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def relative_difference(out_a: Any, out_b: Any) -> float:
    """max |a - b| / max |a| between the main tensors of two model outputs.

    Outputs may be tensors, tuples, mappings or Hugging Face ``ModelOutput``s; both are compared on
    :func:`fusion.checks.main_output` (logits, else the first floating tensor), so caches and
    auxiliary tensors are not compared. Non-finite values count as an infinite difference unless
    both outputs hold them at the same places.
    """
    tensors_a, tensors_b = _output_tensors(main_output(out_a)), _output_tensors(main_output(out_b))
    if len(tensors_a) != len(tensors_b) or not tensors_a:
        raise ValueError("the two outputs do not have the same structure of floating tensors")
    diff = scale = 0.0
    for a, b in zip(tensors_a, tensors_b):
        if a.shape != b.shape:
            return math.inf
        a, b = a.detach().double(), b.detach().double()
        finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
        if not torch.equal(finite_a, finite_b) or not torch.equal(a[~finite_a], b[~finite_b]):
            return math.inf
        if bool(finite_a.any()):
            diff = max(diff, float((a[finite_a] - b[finite_b]).abs().max()))
            scale = max(scale, float(a[finite_a].abs().max()))
    return diff / scale if scale > 0 else diff


# --------------------------------------------------------------------------------------------
# The structural copy and its inputs
# --------------------------------------------------------------------------------------------


def _fan_in(module: nn.Module, tensor: torch.Tensor) -> int:
    if type(module).__name__ == "Conv1D" and tensor.dim() == 2:  # Hugging Face GPT-2: weight is (in, out)
        return int(tensor.shape[0])
    return max(int(tensor[0].numel()), 1)


def _redraw(module: nn.Module, local: str, tensor: torch.Tensor, is_buffer: bool, generator: torch.Generator) -> torch.Tensor:
    """An O(1) random value of the same shape for one parameter or persistent buffer (on the CPU).

    Random numbers are drawn in float32 (4x faster than float64 on the CPU); the copy computes in
    its own dtype, so only the arithmetic, not the draw, needs float64.
    """
    shape = tensor.shape

    def normal(std: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator).mul_(std)

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=generator).mul_(high - low).add_(low)

    if is_buffer:
        if local == "running_var":
            return uniform(0.5, 2.0)
        if local == "running_mean":
            return normal(0.5)
        # Unknown buffers (masks, constants): a per-element positive factor keeps signs, zeros and infinities.
        return tensor.detach().cpu() * uniform(0.5, 1.5).to(tensor.dtype)
    if tensor.dim() <= 1:
        if any(word in local.lower() for word in _BIAS_WORDS):
            # biases and shifts: O(1), clearly away from 0, and positive so that ReLUs after them are alive on most
            # samples (a unit dead on every sample hides a wrong coupling of that unit)
            return uniform(0.2, 1.0)
        return uniform(0.5, 1.5)  # norm scales, gains, layer scales: positive, clearly away from 1
    if "weight" in local and not isinstance(module, nn.Embedding):
        # Linear, conv, attention projections, recurrent weights, custom linears
        return normal(1 / math.sqrt(_fan_in(module, tensor)))
    # embeddings, tokens, positional embeddings, relative-position tables, per-channel gains of any shape
    return normal()


def structural_copy(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A deep copy of ``model`` in ``dtype`` and eval mode with every parameter and persistent
    floating buffer re-drawn at O(1) scale; ``model`` is not touched.

    Matrix/conv weights get std ``1/sqrt(fan_in)`` (activations stay O(1) through depth); embeddings,
    tokens, position tables and other parameters of two or more dims std 1; one-dim parameters are
    biases (uniform in [0.2, 1], positive so that ReLUs stay alive) or scales/gains (uniform in [0.5, 1.5]); BatchNorm
    running means ``N(0, 0.25)``, running variances uniform in [0.5, 2]; other persistent floating
    buffers are multiplied elementwise by a factor in [0.5, 1.5] (masks keep their zeros and
    infinities). Non-persistent buffers (rotary frequencies, causal masks) keep their values.
    Parameters are never copied, only allocated in ``dtype`` and filled.

    Raises:
        TraceError: the model cannot be deep-copied.
    """
    try:
        work = copy.deepcopy(model, _copy_memo(model, dtype))
    except Exception as exc:  # arbitrary user modules: locks, generators, open files
        raise TraceError(f"cannot deep-copy {type(model).__name__} for structural verification: "
                         f"{type(exc).__name__}: {exc}") from exc
    # train() then eval(): modules that cache derived tensors in eval mode (LeViT's attention biases)
    # drop their caches when switched to training, so the copy computes from its re-drawn parameters.
    work = work.to(dtype).train().eval()
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for _, module in work.named_modules():
            persistent = set(module._buffers) - getattr(module, "_non_persistent_buffers_set", set())
            tensors = [(n, p, False) for n, p in module._parameters.items()]
            tensors += [(n, b, True) for n, b in module._buffers.items() if n in persistent]
            for local, tensor, is_buffer in tensors:
                if tensor is None or not tensor.is_floating_point() or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                tensor.copy_(_redraw(module, local, tensor, is_buffer, generator))
    return work


def _copy_memo(model: nn.Module, dtype: torch.dtype) -> dict[int, Any]:
    """A deepcopy memo that allocates floating parameters in ``dtype`` without copying their values (they
    are re-drawn), casts floating buffers, and maps every non-leaf tensor cached in a module attribute
    (which deepcopy refuses) to a detached clone."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if p.is_floating_point():
            memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=p.device), requires_grad=p.requires_grad)
    for b in model.buffers():
        if b.is_floating_point():
            memo[id(b)] = b.detach().to(dtype, copy=True)

    def visit(value: Any, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
        elif depth < 3 and isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)
        elif depth < 3 and isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth + 1)

    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                visit(value)
    return memo


def _is_mask(key: str) -> bool:
    return "mask" in key.lower()


def fresh_inputs(example_inputs: Any, seed: int = 0, dtype: torch.dtype | None = torch.float64) -> Any:
    """A random input of the same structure as ``example_inputs``.

    Floating tensors are re-drawn (normal, with the example's mean and std, cast to ``dtype``);
    integer tensors (token ids, positions) are re-drawn uniformly within the example's value range;
    boolean tensors and entries whose key names a mask are kept; non-tensors are kept.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(value: Any, key: str = "") -> Any:
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bool or _is_mask(key) or value.numel() == 0:
                return _cast(value, dtype)
            if value.is_floating_point():
                ref = value.detach().double()
                std = float(ref.std()) if ref.numel() > 1 else 1.0
                noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
                out = float(ref.mean()) + (std if std > 0 else 1.0) * noise
                return out.to(value.device, dtype or value.dtype)
            if not value.is_complex():
                low, high = int(value.min()), int(value.max())
                return torch.randint(low, high + 1, value.shape, generator=generator).to(value.device, value.dtype)
            return value
        if isinstance(value, Mapping):
            return {k: draw(v, str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(draw(v, key) for v in value)
        return value

    return draw(example_inputs)


def _cast(value: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors (nested) cast to ``dtype``; everything else unchanged."""
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


# --------------------------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------------------------


def _computes_in_lower_precision(model: nn.Module, inputs: Any) -> bool:
    """Whether a float64 model's forward on ``inputs`` produces any float32/16 floating tensor."""
    from torch.overrides import TorchFunctionMode

    class _Watch(TorchFunctionMode):
        lower = False

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                    _Watch.lower = True
            return out

    args, kwargs = split_inputs(inputs)
    with torch.no_grad(), _Watch():
        model(*args, **kwargs)
    return _Watch.lower


class StructuralVerifier:
    """Checks on a structural copy of a model that random permutations of groups keep its function.

    The copy, its two inputs (the example's and a fresh one) and their reference outputs are made
    once; :meth:`difference` then runs two forward passes per call, with permuted tensors passed
    through ``torch.func.functional_call`` (the copy's weights are never rewritten).

    Raises:
        TraceError: the model can be copied and run neither in float64 nor in its own dtype, or its
            re-drawn copy gives non-finite outputs.
    """

    #: Re-draws tried when the copy's output does not depend on its input (e.g. every ReLU of a narrow
    #: layer dead on the few samples), which would make every permutation pass.
    REDRAWS = 3

    def __init__(self, model: nn.Module, example_inputs: Any, seed: int = 0):
        from ..checks import model_dtype

        self.seed = seed
        errors: list[str] = []
        for dtype in dict.fromkeys((torch.float64, model_dtype(model))):
            problem = None
            for attempt in range(self.REDRAWS):
                try:
                    self._prepare(model, example_inputs, dtype, seed + 7919 * attempt)
                except TraceError:
                    raise
                except Exception as exc:  # the copy does not run in this dtype
                    problem = f"{dtype}: {type(exc).__name__}: {exc}"
                    break
                finite = all(bool(torch.isfinite(t).all()) for ref in self.references for t in _output_tensors(main_output(ref)))
                problem = None if finite else f"{dtype}: the re-drawn copy gives non-finite outputs"
                if finite and self._sensitive():
                    break
            if problem is not None:
                errors.append(problem)
                continue
            if not self._sensitive():
                log.warning("the output of the re-drawn %s does not depend on its input; verification is weak",
                            type(model).__name__)
            if dtype != torch.float64:
                log.warning("%s does not run in float64 (%s); verifying in %s with tolerance %g",
                            type(model).__name__, errors[0], dtype, self.tol)
            return
        raise TraceError(f"cannot verify {type(model).__name__} on a re-drawn copy: {'; '.join(errors)}")

    def _prepare(self, model: nn.Module, example_inputs: Any, dtype: torch.dtype, seed: int) -> None:
        from ..checks import model_device, move_inputs

        self.model = structural_copy(model, seed, dtype)
        device = model_device(self.model)
        self.inputs = [move_inputs(_cast(example_inputs, dtype), device),
                       move_inputs(fresh_inputs(example_inputs, seed + 1, dtype), device)]
        self.references = [self._forward({}, x) for x in self.inputs]
        self.dtype, self.tol = dtype, FALLBACK_TOLERANCE.get(dtype, 1e-4)
        if dtype == torch.float64 and _computes_in_lower_precision(self.model, self.inputs[0]):
            # Hugging Face's RMSNorm / T5LayerNorm compute in float32 even in a float64 model:
            # rounding is then ~1e-7, wrong couplings stay >= 1e-4
            self.tol = MIXED_PRECISION_TOLERANCE
        self.state = self.model.state_dict()

    def _sensitive(self) -> bool:
        """Whether the two inputs differ and so do the copy's outputs on them (or the inputs are equal)."""
        a, b = (_output_tensors(x) + [t for t in _flat_tensors(x) if not t.is_floating_point()] for x in self.inputs)
        if all(torch.equal(s, t) for s, t in zip(a, b)):
            return True
        try:
            return relative_difference(*self.references) > self.tol
        except ValueError:
            return True

    def _forward(self, tensors: dict[str, torch.Tensor], inputs: Any) -> Any:
        with torch.no_grad():
            return torch.func.functional_call(self.model, tensors, *split_inputs(inputs), strict=False)

    def difference(self, groups: Sequence[PermutationGroup], perms: dict[str, torch.Tensor] | None = None) -> float:
        """Largest relative output change over both inputs when ``groups`` are permuted by ``perms``
        (default: random, from the verifier's seed)."""
        from ..permute import permute_state_dict

        perms = perms if perms is not None else moving_permutation(groups, seed=self.seed)
        worst = 0.0
        try:
            new_state = permute_state_dict(self.state, groups, perms)
            changed = {k: v for k, v in new_state.items() if v is not self.state[k]}
            for x, reference in zip(self.inputs, self.references):
                worst = max(worst, relative_difference(reference, self._forward(changed, x)))
                if worst > self.tol:
                    break  # the second input cannot make it pass
        except Exception as exc:  # a permutation that breaks the forward (or the indexing) is wrong
            log.debug("permuting %d group(s) raised %s: %s", len(groups), type(exc).__name__, exc)
            return math.inf
        return worst

    def passes(self, groups: Sequence[PermutationGroup]) -> bool:
        return not groups or self.difference(groups) <= self.tol

    def failing(self, groups: Sequence[PermutationGroup]) -> dict[str, float]:
        """Groups whose random permutation changes the output, found by bisection.

        Every group is permuted by a random cycle. Two wrongly coupled groups of equal size (torch.chunk's
        halves mapped to the wrong consumers) cancel out whenever they draw the same cycle (always for
        2 units, 1 in 2 for 3, 1 in 6 for 4, ...): their joint permutation is a true symmetry although
        each alone is not. So the groups are also checked in rounds that permute only those whose
        position in the list has bit ``b`` set: any two groups differ in some bit, so in some round one
        is permuted without the other (log2(len(groups)) extra checks, each two forward passes of the
        copy while it passes). Groups that fail only together (each half passes alone) are resolved
        by adding the groups one at a time; the returned complement always passes as a whole.
        """
        failing = self._bisect(list(groups), None)
        for bit in range(max(len(groups) - 1, 0).bit_length()):
            chosen = [g for i, g in enumerate(groups) if i >> bit & 1 and g.name not in failing]
            failing.update(self._bisect(chosen, None))
        accepted = [g for g in groups if g.name not in failing]
        if not failing or self.passes(accepted):
            return failing
        kept: list[PermutationGroup] = []
        for group in accepted:
            diff = self.difference(kept + [group])
            if diff <= self.tol:
                kept.append(group)
            else:
                failing[group.name] = diff
        return failing

    def _bisect(self, groups: list[PermutationGroup], diff: float | None) -> dict[str, float]:
        if not groups:
            return {}
        diff = self.difference(groups) if diff is None else diff
        if diff <= self.tol:
            return {}
        if len(groups) == 1:
            return {groups[0].name: diff}
        half = len(groups) // 2
        return {**self._bisect(groups[:half], None), **self._bisect(groups[half:], None)}

    def repairing_tensor(self, group: PermutationGroup, candidates: Sequence[tuple[str, int, AxisMember]]
                         ) -> tuple[str, int] | None:
        """The first ``(tensor, axis)`` among ``candidates`` that makes ``group`` pass when moved with it.

        Each candidate is ``(tensor name, axis, member)``: the tensor is moved along ``axis`` with
        ``member``'s index. Used to name a tensor that the forward reads along the group's units but
        that no rule moves (e.g. a weight-standardised convolution's per-channel gain).
        """
        for name, axis, member in candidates:
            extended = PermutationGroup(group.name, group.size, group.members + (AxisMember(name, axis, member.index),),
                                        group.producers, group.consumers, group.kind)
            if self.passes([extended]):
                return name, axis
        return None


def moving_permutation(groups: Sequence[PermutationGroup], seed: int = 0) -> dict[str, torch.Tensor]:
    """A random permutation of every group that moves every unit: a uniformly random cycle through all
    of the group's units. A uniformly random permutation of a small group is often the identity (1 in
    2 for two units) or leaves units in place, which would hide a wrong coupling of those units."""
    generator = torch.Generator().manual_seed(seed)
    perms = {}
    for group in groups:
        order = torch.randperm(group.size, generator=generator)
        perm = torch.empty_like(order)
        perm[order] = order.roll(1)  # order[i] receives the unit order[i - 1]
        perms[group.name] = perm
    return perms


def _unmoved_candidates(group: PermutationGroup, shapes: dict[str, tuple[int, ...]], moved: set[tuple[str, int]]
                        ) -> list[tuple[str, int, AxisMember]]:
    """Tensors of the modules a group touches that have an axis as long as the group's axis there
    and that no group moves along it: ``(tensor, axis, member whose index it would follow)``."""
    by_module: dict[str, list[str]] = {}
    for key in shapes:
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    own = {m.name for m in group.members}
    out, seen = [], set()
    for member in group.members:
        length = shapes[member.name][member.axis]
        for key in by_module.get(member.name.rpartition(".")[0], ()):
            for axis, n in enumerate(shapes[key]):
                if n == length and key not in own and (key, axis) not in moved and (key, axis) not in seen:
                    seen.add((key, axis))
                    out.append((key, axis, member))
    return out


def verify_groups(model: nn.Module, example_inputs: Any, groups: Sequence[PermutationGroup], seed: int = 0
                  ) -> tuple[list[PermutationGroup], list[SkippedGroup]]:
    """Split ``groups`` into those that keep the function of a structural copy of ``model`` and the
    refused ones (kind ``"verification"``, ``"unmoved tensor"`` when moving a tensor that no rule
    moves would repair the group, or ``"trace"`` when the model cannot be verified at all)."""
    if not groups:
        return [], []
    try:
        verifier = StructuralVerifier(model, example_inputs, seed)
    except TraceError as exc:
        reason = f"not verified: {exc}; pass verify=False to accept the graph's groups unchecked"
        return [], [SkippedGroup(g.name, g.size, reason, "trace") for g in groups]
    failing = verifier.failing(groups)
    if not failing:
        return list(groups), []
    log.warning("refusing %d permutation group(s) that change the function of the structural copy: %s",
                len(failing), sorted(failing))
    shapes = {k: tuple(v.shape) for k, v in verifier.state.items()}
    skipped = []
    moved = {(m.name, m.axis) for g in groups for m in g.members}
    for group in (g for g in groups if g.name in failing):
        tensor = verifier.repairing_tensor(group, _unmoved_candidates(group, shapes, moved)[:_MAX_CANDIDATES])
        if tensor is not None:
            skipped.append(SkippedGroup(group.name, group.size, f"{tensor[0]} (axis {tensor[1]}) is indexed by these "
                                        "units but no rule moves it", "unmoved tensor"))
        else:
            skipped.append(SkippedGroup(group.name, group.size, f"a random permutation changed the function "
                                        f"(relative difference {failing[group.name]:.2e} > {verifier.tol:g} on a "
                                        f"{str(verifier.dtype).removeprefix('torch.')} copy with re-drawn weights); "
                                        "the dependency graph is unsure here", "verification"))
    return [g for g in groups if g.name not in failing], skipped


def structural_difference(
    model: nn.Module,
    spec_or_groups: Any,
    example_inputs: Any,
    perms: dict[str, Any] | None = None,
    seed: int = 0,
) -> float:
    """How much permuting ``model``'s groups changes the function of its structural copy.

    The model is deep-copied to float64 with every parameter and normalisation statistic re-drawn
    at O(1) scale (:func:`structural_copy`); the permutations (default: random, from ``seed``) are
    applied to the copy, and the largest relative output difference over ``example_inputs`` and a
    fresh random input of the same structure (:func:`fresh_inputs`) is returned. A correct spec
    gives <= :data:`STRUCTURAL_TOLERANCE` (1e-9); a wrong coupling typically >= 1e-4.

    Args:
        model: the model (not modified, not even its train/eval mode).
        spec_or_groups: a :class:`~fusion.PermutationSpec` or an iterable of :class:`PermutationGroup`.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        perms: group name -> permutation; groups not listed stay in place. Default: a random
            permutation of every group that moves every unit (:func:`moving_permutation`).
        seed: seed of the re-drawn weights, the fresh input and the default permutations.

    Returns:
        The relative difference (0.0 for a function-preserving permutation up to rounding).

    Raises:
        TraceError: the model cannot be copied or run (see :class:`StructuralVerifier`).
        PermutationError: ``perms`` is malformed or names unknown groups.
    """
    from ..permute import _groups, check_permutations

    groups = _groups(spec_or_groups)
    checked = check_permutations(groups, perms) if perms is not None else None
    return StructuralVerifier(model, example_inputs, seed).difference(groups, checked)
