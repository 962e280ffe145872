"""fusion: compare, align and merge PyTorch models through permutation symmetries."""

from __future__ import annotations

from . import errors
from .errors import *  # noqa: F401,F403

__version__ = "0.1.0"

__all__ = ["__version__", "errors", *errors.__all__]
