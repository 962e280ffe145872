"""Smoke tests of the benchmarks' ``--quick`` mode and of their shared helpers.

Speed is never asserted: only that each benchmark runs, prints a markdown table and the command
that reproduces it, writes its JSON report, and that the measured results are sane (an alignment
keeps the function, a missing peer is skipped with a message).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import benchlib as common  # noqa: E402


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def _report(folder: Path) -> dict:
    return json.loads((folder / "quick.json").read_text())


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def test_markdown_table_has_header_separator_and_one_line_per_row():
    table = common.markdown_table([{"a": 1, "b": 0.5}, {"a": 2, "b": None}], {"a": "A", "b": "B"})
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1 | 0.5 |", "| 2 | – |"]


def test_format_value_marks_failures_loudly():
    assert common.format_value(False) == "NO"
    assert common.format_value(True) == "yes"
    assert common.format_value(1.5e-7) == "1.50e-07"


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    common.write_json(tmp_path, "x", {"v": 1})
    common.write_json(tmp_path, "x", {"v": torch.tensor(2.0)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": 2.0}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_profile_call_reports_focus_functions_with_their_cumulative_time():
    def inner() -> float:
        return sum(i * i for i in range(20000))

    def outer() -> float:
        return inner() + inner()

    profile = common.profile_call(outer, focus=("inner", "absent"))
    names = [entry["name"] for entry in profile["focus"]]
    assert names == ["inner"]
    assert profile["focus"][0]["calls"] == 2
    assert 0 < profile["focus"][0]["cumulative_s"] <= profile["total"]


def test_peak_sampler_sees_an_allocation_inside_the_block():
    # Freed memory from earlier tests may be reused, so compare with the RSS seen inside the block.
    import time

    with common.PeakSampler(interval=0.001) as sampler:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        block.add_(1)
        inside = common.current_rss_bytes()
        time.sleep(0.05)
    assert sampler.peak >= inside - 4 * 1024 * 1024
    assert sampler.peak >= block.numel() * 4
    del block


def test_command_line_is_relative_to_the_repository():
    assert common.command_line([str(BENCHMARKS / "bench_spec.py"), "--quick"]).endswith(
        "python benchmarks/bench_spec.py --quick")


# --------------------------------------------------------------------------------------------
# The benchmarks in --quick mode
# --------------------------------------------------------------------------------------------


def test_bench_spec_quick_runs_as_a_script(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_spec.py"), "--quick", "--no-profile",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| model | params (M) |" in done.stdout
    assert "python benchmarks/bench_spec.py --quick --no-profile --out" in done.stdout
    rows = _report(tmp_path)["results"]["rows"]
    assert [r["model"] for r in rows] == ["resnet18"]
    assert rows[0]["permute_rel_diff"] < 1e-5
    assert rows[0]["spec_s"] > 0 and rows[0]["tp_build_s"] > 0


def test_bench_align_quick_aligns_without_changing_the_function(tmp_path, restore_threads):
    import bench_align

    results = bench_align.main(["--quick", "--out", str(tmp_path), "--threads", str(restore_threads),
                                "--widths", "64", "--depths", "2"])
    ours = [r for r in results["rows"] if r["tool"] == "fusion"]
    baseline = next(r for r in results["rows"] if r["tool"] == "unaligned B")
    assert len(ours) == 1 and ours[0]["same_function"]
    assert ours[0]["objective"] >= baseline["objective"]
    assert results["width"][0]["width"] == 64
    assert _report(tmp_path)["results"]["max_iter"] == 100
    if results["peer"]:
        assert any(r["tool"] == "rebasin" for r in results["rows"])


def test_bench_align_skips_a_missing_peer_with_a_message(tmp_path, restore_threads, monkeypatch, capsys):
    import bench_align

    monkeypatch.setitem(sys.modules, "rebasin", None)  # makes `import rebasin` fail
    results = bench_align.main(["--quick", "--out", str(tmp_path), "--threads", str(restore_threads),
                                "--widths", "64", "--depths", "2"])
    assert not results["peer"]
    assert all(r["tool"] != "rebasin" for r in results["rows"])
    assert "Peer skipped: the `rebasin` package is not installed" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_fuse_quick_measures_each_configuration_in_its_own_process(tmp_path):
    import bench_fuse

    results = bench_fuse.main(["--quick", "--out", str(tmp_path)])
    tools = [(r["tool"], r["members"]) for r in results["rows"]]
    assert tools == [("concat", 2), ("transplant", 2), ("ot", 2)]
    for row in results["rows"]:
        assert row["peak"] >= row["baseline_peak"] > 0
        assert row["same_architecture"]
    concat = results["rows"][0]
    assert concat["result_bytes"] > 2 * concat["member_bytes"]  # hidden widths doubled: more than 2x the weights
    assert (tmp_path / "quick.md").read_text().startswith("### small ResNet")
