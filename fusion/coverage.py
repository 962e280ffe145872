"""How much of a model its permutation spec reaches, and whether permuting keeps its function.

Used by the zoo experiment and the README's coverage table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .permute import permute, random_permutation, verify_equivalence
from .spec import PermutationSpec, permutation_spec, structural_difference

__all__ = ["Coverage", "permutation_coverage"]


@dataclass(frozen=True)
class Coverage:
    """Coverage of one model by its permutation spec.

    Attributes:
        model: a label for the model.
        groups: number of permutation groups.
        skipped: number of refused unit sets (the output layer included).
        hidden_groups_permuted: fraction of hidden-unit sets (channel groups + refused sets of every
            kind except ``"output"``) that are permutable; 0.0 when the model has no hidden units.
        skipped_by_kind: number of refused sets per :attr:`SkippedGroup.kind`.
        params_changed: fraction of floating-point parameter/buffer elements that a random
            permutation changes.
        max_rel_diff: ``verify_equivalence`` of the model and its random permutation.
        structural_diff: :func:`~fusion.structural_difference` of the same permutation (float64 copy
            with re-drawn weights): the check that the symmetry holds for every weight values.
    """

    model: str
    groups: int
    skipped: int
    hidden_groups_permuted: float
    params_changed: float
    max_rel_diff: float
    structural_diff: float = 0.0
    skipped_by_kind: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def permutation_coverage(
    model: nn.Module,
    example_inputs: Any,
    spec: PermutationSpec | None = None,
    seed: int = 0,
    label: str | None = None,
) -> Coverage:
    """Measure a spec's coverage of ``model`` and check that a random permutation keeps its function."""
    spec = spec if spec is not None else permutation_spec(model, example_inputs)
    perms = random_permutation(spec, seed=seed)
    permuted = permute(model, perms, spec)
    before, after = model.state_dict(), permuted.state_dict()
    total = changed = 0
    for key, tensor in before.items():
        if tensor.is_floating_point():
            total += tensor.numel()
            changed += int((tensor != after[key]).sum())
    channel_groups = {g.name.split("[")[0].split("#")[0] for g in spec.groups if g.kind == "channels"}
    hidden_skipped = [s for s in spec.skipped if s.kind != "output"]
    hidden = len(channel_groups) + len(hidden_skipped)
    return Coverage(
        model=label or type(model).__name__,
        groups=len(spec.groups),
        skipped=len(spec.skipped),
        hidden_groups_permuted=len(channel_groups) / hidden if hidden else 0.0,
        params_changed=changed / total if total else 0.0,
        max_rel_diff=verify_equivalence(model, permuted, example_inputs),
        structural_diff=structural_difference(model, spec, example_inputs, perms=perms, seed=seed) if spec.groups else 0.0,
        skipped_by_kind=dict(Counter(s.kind for s in spec.skipped)),
    )


