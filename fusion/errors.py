"""Every exception that `fusion` raises on bad input.

All of them derive from :class:`FusionError`, so ``except fusion.FusionError`` catches any
user-facing failure of the toolkit; each subclass also derives from the built-in exception a
caller would naturally expect (``ValueError``, ``TypeError``, ``RuntimeError``), so generic
handlers keep working. Messages name the layer, parameter, shape or argument at fault.
"""

from __future__ import annotations

__all__ = [
    "FusionError",
    "TraceError",
    "ExampleInputError",
    "PermutationError",
    "SpecMismatchError",
    "ArchitectureMismatchError",
    "NonFiniteWeightsError",
    "DeviceMismatchError",
    "DataError",
    "EnsembleError",
    "AlignmentError",
    "WidthMismatchError",
    "ConcatError",
    "BendingError",
    "StitchError",
    "LayerError",
    "CheckpointError",
    "MergeConfigError",
]


class FusionError(Exception):
    """Base class of every error raised by `fusion` for bad input or an unsupported model."""


class TraceError(FusionError, RuntimeError):
    """The model could not be traced (torch-pruning's dependency graph or torch.fx failed)."""


class ExampleInputError(FusionError, ValueError):
    """``example_inputs`` (or a data batch) was rejected by the model: wrong shape, dtype or type."""


class PermutationError(FusionError, ValueError):
    """A permutation is malformed (repeats, wrong length, dtype or range) or names no known group."""


class SpecMismatchError(FusionError, ValueError):
    """A :class:`~fusion.PermutationSpec` was used with a model of another architecture."""


class ArchitectureMismatchError(FusionError, ValueError):
    """Two or more models that must share an architecture do not (names the first difference)."""


class NonFiniteWeightsError(FusionError, ValueError):
    """A parameter or buffer holds NaN or infinite values where finite values are required."""


class DeviceMismatchError(FusionError, ValueError):
    """Models or tensors that must live on one device and share one dtype do not."""


class DataError(FusionError, ValueError):
    """Data is missing, empty, malformed, or a data folder does not exist."""


class EnsembleError(FusionError, ValueError):
    """An ensemble operation got too few models or invalid member weights."""


class AlignmentError(FusionError, ValueError):
    """Alignment cannot be computed (unknown method or cost, unequal widths with a hard method)."""


class WidthMismatchError(ArchitectureMismatchError, AlignmentError):
    """Two models share an architecture but not their widths, and the method needs equal widths."""


class ConcatError(FusionError, ValueError):
    """Models cannot be concatenated exactly (a layer or construct without a concatenation rule)."""


class BendingError(FusionError, ValueError):
    """A bending request is invalid (unknown weight/activation name, shape mismatch, bad probability)."""


class StitchError(FusionError, ValueError):
    """A stitched model cannot be built or fitted (unknown layer, incompatible shapes)."""


class LayerError(FusionError, ValueError):
    """A layer of :mod:`fusion.layers` was built or fitted with invalid arguments (rank, groups, shapes)."""


class CheckpointError(FusionError, OSError):
    """A checkpoint or model name could not be read, resolved or written."""


class MergeConfigError(FusionError, ValueError):
    """A merge of fine-tunes is misconfigured: an unknown method, key or parameter, a value out of
    range (a density outside (0, 1], weights of the wrong length), or a missing base model."""
