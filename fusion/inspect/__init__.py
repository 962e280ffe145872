"""fusion.inspect: inspect and bend models, capture activations, cut and merge graphs, stitch models together.

Public names are also re-exported from :mod:`fusion`.
"""

from __future__ import annotations

from ..moments import CrossMoments
from .bend import ORIGINAL, BendedModule, BendingConfig, Inspector
from .callbacks import (
    BendingCallback,
    Lambda,
    Mask,
    Noise,
    Permute,
    Scale,
    register_bending_callback,
)
from .capture import ActivationCapture, features_as_matrix
from .graphs import merge_graph_modules, set_output
from .stitch import (
    STITCH_KINDS,
    StitchedModel,
    StitchFit,
    StitchLayer,
    cut_points,
    fit_stitch,
    make_stitch_layer,
    stitch,
)

__all__ = [
    "ORIGINAL",
    "STITCH_KINDS",
    "ActivationCapture",
    "BendedModule",
    "BendingCallback",
    "BendingConfig",
    "CrossMoments",
    "Inspector",
    "Lambda",
    "Mask",
    "Noise",
    "Permute",
    "Scale",
    "StitchFit",
    "StitchLayer",
    "StitchedModel",
    "cut_points",
    "features_as_matrix",
    "fit_stitch",
    "make_stitch_layer",
    "merge_graph_modules",
    "register_bending_callback",
    "set_output",
    "stitch",
]
