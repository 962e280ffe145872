"""fusion.inspect: inspect and bend models, capture activations, stitch models together.

Public names are also re-exported from :mod:`fusion`.
"""

from __future__ import annotations

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
from .moments import CrossMoments
from .stitch import (
    STITCH_KINDS,
    LinearStitch,
    LowRankStitch,
    ProcrustesStitch,
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
    "LinearStitch",
    "LowRankStitch",
    "Mask",
    "Noise",
    "Permute",
    "ProcrustesStitch",
    "Scale",
    "StitchFit",
    "StitchLayer",
    "StitchedModel",
    "cut_points",
    "features_as_matrix",
    "fit_stitch",
    "make_stitch_layer",
    "register_bending_callback",
    "stitch",
]
