"""fusion: compare, align and merge PyTorch models through their permutation symmetries.

The permutation spec (:func:`permutation_spec`) is derived from torch-pruning's dependency graph;
everything else (permute, align, fuse, analyse) is built on it.
"""

from __future__ import annotations

from . import errors
from .coverage import Coverage, permutation_coverage
from .errors import *  # noqa: F401,F403
from .permute import (
    check_permutations,
    compose_permutations,
    identity_permutation,
    inverse_permutation,
    permute,
    permute_layer,
    permute_state_dict,
    random_permutation,
    swap_neurons,
    verify_equivalence,
)
from .spec import AxisMember, PermutationGroup, PermutationSpec, SkippedGroup, permutation_spec

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "errors",
    *errors.__all__,
    # spec and permutations
    "AxisMember",
    "PermutationGroup",
    "PermutationSpec",
    "SkippedGroup",
    "permutation_spec",
    "permute",
    "permute_state_dict",
    "permute_layer",
    "swap_neurons",
    "random_permutation",
    "identity_permutation",
    "inverse_permutation",
    "compose_permutations",
    "check_permutations",
    "verify_equivalence",
    "Coverage",
    "permutation_coverage",
]
