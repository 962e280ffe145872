"""Fusion of several models into one: averaging, aligned merging, OT fusion, neuron transplantation,
BatchNorm reset / REPAIR and fine-tuning (public names are re-exported from :mod:`fusion`)."""

from __future__ import annotations

from .average import average, average_state_dicts, interpolate
from .concat import concat_models
from .finetune import (
    FinetuneRecord,
    FinetuneResult,
    finetune,
    finetune_with_history,
    train_model,
)
from .merge import MergeResult, merge, merge_with_alignments
from .norm import repair, reset_bn_stats
from .ot_fusion import ot_fusion
from .transplant import fuse_ensemble, fuse_hierarchical, fuse_iterative

__all__ = [
    "FinetuneRecord",
    "FinetuneResult",
    "MergeResult",
    "average",
    "average_state_dicts",
    "concat_models",
    "finetune",
    "finetune_with_history",
    "fuse_ensemble",
    "fuse_hierarchical",
    "fuse_iterative",
    "interpolate",
    "merge",
    "merge_with_alignments",
    "ot_fusion",
    "repair",
    "reset_bn_stats",
    "train_model",
]
