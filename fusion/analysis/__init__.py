"""Analysis of models and of paths between them (public names are re-exported from fusion/__init__.py).

* :mod:`.interpolation`: loss/accuracy along the straight line, and the barrier on it;
* :mod:`.distances`: per-parameter / per-layer weight distances (raw, normalized, relative L2);
* :mod:`.curves`: Bézier mode-connecting curves (Garipov et al. 2018) and their evaluation;
* :mod:`.plots`: interpolation figures, distance heatmaps and animated GIFs;
* :mod:`.ntk`: empirical neural tangent kernels, their spectrum, alignment and the NTK along a path;
* :mod:`.io`: atomic writing of ``.npz`` / JSON results.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# Public names by the module defining them, imported on first use (see fusion._lazy).
_EXPORTS = {
    ".curves": ("BezierCurve", "CurveEvaluation", "bernstein_weights", "evaluate_curve", "load_curve_evaluation",
                "train_bezier_curve"),
    ".distances": ("METRICS", "LayerDistances", "layer_distances", "state_dict_distances"),
    ".interpolation": ("InterpolationCurve", "barrier", "interpolation_curve", "load_interpolation_curve"),
    ".ntk": ("NTKPath", "empirical_ntk", "kernel_alignment", "ntk_alignment", "ntk_eigenvalues", "ntk_path"),
    ".plots": ("animate_layer_distances", "plot_distance_heatmap", "plot_interpolation"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

# Representation-similarity names (fusion.analysis.similarity) are added here by the lead.

__all__ = [
    "METRICS",
    "BezierCurve",
    "CurveEvaluation",
    "InterpolationCurve",
    "LayerDistances",
    "NTKPath",
    "animate_layer_distances",
    "barrier",
    "bernstein_weights",
    "empirical_ntk",
    "evaluate_curve",
    "interpolation_curve",
    "kernel_alignment",
    "layer_distances",
    "load_curve_evaluation",
    "load_interpolation_curve",
    "ntk_alignment",
    "ntk_eigenvalues",
    "ntk_path",
    "plot_distance_heatmap",
    "plot_interpolation",
    "state_dict_distances",
    "train_bezier_curve",
]
