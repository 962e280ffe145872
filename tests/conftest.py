"""Shared fixtures and tolerances for the test suite."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("FUSION_TEST_THREADS", "1")))

#: Relative output difference accepted for "the same function" in float32.
EQUIV_TOL = 1e-5
#: Absolute tolerance for "the same weights" after an exact recovery.
WEIGHT_TOL = 1e-6


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
