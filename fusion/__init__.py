"""fusion: compare, align and merge PyTorch models through their permutation symmetries.

The permutation spec (:func:`permutation_spec`) is derived from torch-pruning's dependency graph;
everything else is built on it:

* spec and permutations: :func:`permutation_spec`, :func:`permute`, :func:`swap_neurons`,
  :func:`permute_layer`, :func:`verify_equivalence`;
* alignment: :func:`align`, :func:`align_many` (weight, activation and optimal-transport matching);
* fusion: :func:`average`, :func:`interpolate`, :func:`merge`, :func:`ot_fusion`,
  :func:`concat_models`, :func:`fuse_ensemble`, :func:`reset_bn_stats`, :func:`repair`,
  :func:`finetune`;
* analysis: :func:`interpolation_curve`, :func:`layer_distances`, Bézier curves, similarity, plots;
* inspection: :class:`Inspector`, bending, :func:`stitch`;
* data and reference models: :mod:`fusion.data`, :mod:`fusion.models`.
"""

from __future__ import annotations

from . import errors
from ._lazy import lazy_exports

# Public names by the module defining them, imported on first use (``fusion --help`` starts without torch).
_EXPORTS = {
    ".errors": tuple(errors.__all__),
    ".align": ("Alignment", "align", "align_many"),
    ".analysis": (
        "METRICS", "BezierCurve", "CurveEvaluation", "InterpolationCurve", "LayerDistances",
        "animate_layer_distances", "barrier", "evaluate_curve", "interpolation_curve", "layer_distances",
        "plot_distance_heatmap", "plot_interpolation", "train_bezier_curve",
    ),
    ".analysis.similarity": (
        "SimilarityResult", "linear_cka", "matched_correlation", "procrustes_distance", "representation_similarity",
    ),
    ".checkpoint": ("build_architecture", "load_model", "save_model"),
    ".coverage": ("Coverage", "permutation_coverage"),
    ".evaluate": ("Evaluation", "ensemble_evaluate", "evaluate"),
    ".fuse": (
        "MergeResult", "average", "concat_models", "finetune", "fuse_ensemble", "fuse_hierarchical",
        "fuse_iterative", "interpolate", "merge", "merge_with_alignments", "ot_fusion", "repair", "reset_bn_stats",
    ),
    ".inspect": (
        "BendedModule", "BendingConfig", "Inspector", "Mask", "Noise", "Permute", "Scale", "fit_stitch",
        "merge_graph_modules", "set_output", "stitch",
    ),
    ".permute": (
        "check_permutations", "compose_permutations", "identity_permutation", "inverse_permutation", "layer_group",
        "permute", "permute_layer", "permute_state_dict", "random_permutation", "swap_neurons", "verify_equivalence",
    ),
    ".merging": ("merge_task_vectors", "merge_yaml"),
    ".spec": ("AxisMember", "PermutationGroup", "PermutationSpec", "SkippedGroup", "permutation_spec",
              "structural_difference"),
}
_SUBMODULES = ("analysis", "checkpoint", "data", "errors", "layers", "merging", "models", "neuronswap", "tracking")
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "analysis",
    "checkpoint",
    "data",
    "errors",
    "layers",
    "merging",
    "models",
    "neuronswap",
    "tracking",
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
    "layer_group",
    "random_permutation",
    "identity_permutation",
    "inverse_permutation",
    "compose_permutations",
    "check_permutations",
    "verify_equivalence",
    "structural_difference",
    "Coverage",
    "permutation_coverage",
    # alignment
    "Alignment",
    "align",
    "align_many",
    # fusion
    "average",
    "interpolate",
    "merge",
    "merge_with_alignments",
    "MergeResult",
    "ot_fusion",
    "concat_models",
    "fuse_ensemble",
    "fuse_iterative",
    "fuse_hierarchical",
    "reset_bn_stats",
    "repair",
    "finetune",
    # merging fine-tunes of one base
    "merge_task_vectors",
    "merge_yaml",
    # checkpoints
    "build_architecture",
    "load_model",
    "save_model",
    # evaluation
    "Evaluation",
    "evaluate",
    "ensemble_evaluate",
    # analysis
    "METRICS",
    "InterpolationCurve",
    "interpolation_curve",
    "barrier",
    "LayerDistances",
    "layer_distances",
    "BezierCurve",
    "CurveEvaluation",
    "train_bezier_curve",
    "evaluate_curve",
    "plot_interpolation",
    "plot_distance_heatmap",
    "animate_layer_distances",
    "SimilarityResult",
    "linear_cka",
    "procrustes_distance",
    "matched_correlation",
    "representation_similarity",
    # inspection
    "Inspector",
    "BendedModule",
    "BendingConfig",
    "Mask",
    "Scale",
    "Permute",
    "Noise",
    "stitch",
    "fit_stitch",
    "set_output",
    "merge_graph_modules",
]
