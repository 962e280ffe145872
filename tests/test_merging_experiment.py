"""Experiment 08 (task merging) runs in its quick budget and shows what align_first does."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_ex08_merges_beat_each_fine_tune_overall_and_align_first_undoes_a_permuted_start(tmp_path):
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        module = importlib.import_module("ex08_task_merging")
        results = module.main(["--quick", "--quiet", "--output-dir", str(tmp_path)])
    finally:
        sys.path.remove(str(EXPERIMENTS))
    merges, permuted = results["merges"], results["permuted_member"]
    best_tune = max(merges["fine-tune A"]["all"], merges["fine-tune B"]["all"])
    assert merges["ties (density 0.5)"]["all"] > best_tune
    for method in ("task_arithmetic", "ties"):
        assert permuted[f"{method}, align_first=True"]["all"] > permuted[f"{method}, align_first=False"]["all"] + 0.1
    assert (tmp_path / "table.md").is_file()
