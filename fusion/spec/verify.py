"""Checking permutation groups on a model: a random permutation must keep its output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .records import PermutationGroup


def _output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def relative_difference(out_a: Any, out_b: Any) -> float:
    """max |a - b| / max |a| over all floating tensors of two (nested) model outputs."""
    tensors_a, tensors_b = _output_tensors(out_a), _output_tensors(out_b)
    if len(tensors_a) != len(tensors_b) or not tensors_a:
        raise ValueError("the two outputs do not have the same structure of floating tensors")
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(tensors_a, tensors_b))
    scale = max(float(a.double().abs().max()) for a in tensors_a)
    return diff / scale if scale > 0 else diff


class _Verifier:
    """Checks on the real model that random permutations of some groups keep its output.

    Takes ownership of ``model`` (a private copy). Runs in the model's own dtype: a wrong
    coupling changes a random network's output by orders of magnitude more than rounding
    (relative difference >= 1e-2 in practice, against <= 1e-5 from summation order in float32),
    so the tolerance is 1e-4 for float32 (1e-9 for float64, 2e-2 for half precision). Permuted
    tensors are passed through ``torch.func.functional_call``, so the model's weights are never
    rewritten.
    """

    TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}

    def __init__(self, model: nn.Module, example_inputs: Any, seed: int):
        from ..checks import model_dtype
        from ..permute import permute_state_dict, random_permutation

        self._permute_state_dict = permute_state_dict
        self._random_permutation = random_permutation
        self.seed = seed
        self.model, self.inputs = model.eval(), example_inputs
        self.tol = self.TOLERANCE.get(model_dtype(model), 1e-4)
        self.reference = self._forward({})
        self.state = model.state_dict()

    def _forward(self, tensors: dict[str, torch.Tensor]) -> Any:
        with torch.no_grad():
            return torch.func.functional_call(self.model, tensors, _as_args(self.inputs), _as_kwargs(self.inputs),
                                              strict=False)

    def difference(self, groups: Sequence[PermutationGroup]) -> float:
        perms = self._random_permutation(groups, seed=self.seed)
        new_state = self._permute_state_dict(self.state, groups, perms)
        changed = {k: v for k, v in new_state.items() if v is not self.state[k]}
        return relative_difference(self.reference, self._forward(changed))

    def failing(self, groups: Sequence[PermutationGroup]) -> dict[str, float]:
        """Groups whose random permutation changes the output (found by bisection)."""
        if not groups:
            return {}
        diff = self.difference(groups)
        if diff <= self.tol:
            return {}
        if len(groups) == 1:
            return {groups[0].name: diff}
        half = len(groups) // 2
        return {**self.failing(groups[:half]), **self.failing(groups[half:])}


def _as_args(inputs: Any) -> tuple:
    if isinstance(inputs, dict):
        return ()
    return tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)


def _as_kwargs(inputs: Any) -> dict:
    return dict(inputs) if isinstance(inputs, dict) else {}

