"""Checking permutation groups on a model: a random permutation must keep its output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..checks import main_output, split_inputs
from .records import PermutationGroup


def relative_difference(out_a: Any, out_b: Any) -> float:
    """max |a - b| / max |a| between the main tensors of two model outputs.

    Outputs may be tensors, tuples, mappings or Hugging Face ``ModelOutput``s; both are compared
    on :func:`fusion.checks.main_output` (logits, else the first floating tensor), so caches and
    auxiliary tensors are not compared.
    """
    a, b = main_output(out_a).double(), main_output(out_b).double()
    if a.shape != b.shape:
        raise ValueError(f"the two outputs have main tensors of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    diff = float((a - b).abs().max())
    scale = float(a.abs().max())
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
            args, kwargs = split_inputs(self.inputs)
            return main_output(torch.func.functional_call(self.model, tensors, args, kwargs, strict=False))

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
