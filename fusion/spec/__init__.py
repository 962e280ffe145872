"""Permutation specs: which weight axes must be permuted together to keep a network's function.

A hidden unit (neuron, channel, embedding feature) can be moved to another position without
changing what the network computes, provided every tensor that reads or writes that unit is
re-indexed the same way. :func:`permutation_spec` derives these coupled sets automatically from
torch-pruning's ``DependencyGraph`` (Fang et al., "DepGraph: Towards Any Structural Pruning",
CVPR 2023), which already tracks channel coupling across residual adds, concatenations, splits,
normalisation layers, depthwise/grouped convolutions, attention and parameters outside modules.

Each :class:`PermutationGroup` is a free permutation of ``size`` units. For each tensor axis it
touches, an :class:`AxisMember` stores ``index`` of shape ``(size, block)``: the positions along
that axis occupied by each unit. ``block`` is 1 for a plain channel, ``h*w`` when a flatten turns a
channel into a block of features (VGG's classifier), and ``groups`` for a grouped convolution's
producer, whose channels move in lock-step inside every conv group. A permutation ``perm`` of a
group (``perm[i]`` = the unit of the source model that lands at position ``i``) moves the values at
``index[perm[i]]`` to ``index[i]`` on every member at once.

Where the graph is unsure, the group is left out and listed in :attr:`PermutationSpec.skipped`
with a reason and a kind: a refused group costs coverage, a wrong one costs the user's model. By
default every group is also checked structurally (:mod:`fusion.spec.verify`): on a float64 copy
of the model with every parameter and normalisation statistic re-drawn at O(1) scale, a random
permutation must leave the output on ``example_inputs`` and on a fresh random input unchanged
(relative difference <= 1e-9); groups that fail are found by bisection and refused.
"""

from .build import permutation_spec
from .records import SKIP_KINDS, AxisMember, PermutationGroup, PermutationSpec, SkippedGroup
from .verify import STRUCTURAL_TOLERANCE, relative_difference, structural_difference

__all__ = [
    "AxisMember",
    "PermutationGroup",
    "PermutationSpec",
    "SkippedGroup",
    "permutation_spec",
    "relative_difference",
    "structural_difference",
    "STRUCTURAL_TOLERANCE",
    "SKIP_KINDS",
]
