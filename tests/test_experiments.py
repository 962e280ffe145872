"""The numbered experiments in --quick mode: they run, write their results and show what they claim."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from fusion.errors import DataError

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def load():
    """Import an experiment script as a module (the scripts import their sibling ``excommon``)."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(EXPERIMENTS))


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory) -> str:
    """One MNIST-1D cache folder for the module's runs (generated once, a few seconds)."""
    return str(tmp_path_factory.mktemp("mnist1d"))


def _png(path: Path) -> None:
    assert Image.open(path).format == "PNG"


def test_ex03_alignment_lowers_the_barrier(load, tmp_path) -> None:
    results = load("ex03_rebasin_barriers").main(["--quick", "--quiet", "--widths", "1", "--output-dir", str(tmp_path)])
    (row,) = results["rows"]
    methods = ("naive", "weight", "activation", "ot")
    assert set(row["barrier"]) == {f"{m}{r}" for m in methods for r in ("", " + REPAIR")}
    assert row["barrier"]["weight"] < row["barrier"]["naive"]
    assert row["barrier"]["weight + REPAIR"] <= row["barrier"]["weight"]
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["width_multiplier"] == 1
    _png(tmp_path / "barrier_vs_width_mlp.png")


@pytest.mark.slow
def test_ex03_mnist1d_normalised_cnns_get_bn_reset_and_repair_reductions(load, tmp_path, mnist1d_cache) -> None:
    results = load("ex03_rebasin_barriers").main(["--quick", "--quiet", "--dataset", "mnist1d", "--data-root",
                                                  mnist1d_cache, "--limit", "600", "--widths", "1", "--families",
                                                  "cnn-bn", "cnn-ln", "--output-dir", str(tmp_path)])
    bn, ln = results["rows"]
    assert (bn["family"], ln["family"], results["dataset"]) == ("cnn-bn", "cnn-ln", "mnist1d")
    assert {"naive + BN reset", "weight + BN reset", "ot + REPAIR"} <= set(bn["barrier"])
    assert not any("BN reset" in k for k in ln["barrier"])  # no BatchNorm to reset
    assert bn["barrier"]["naive + BN reset"] < bn["barrier"]["naive"]  # interpolated BN statistics describe no network
    for row in (bn, ln):
        assert set(row["repair_reduction"]) == {"naive", "weight", "activation", "ot"}
        base = row["barrier"]["weight + BN reset" if row is bn else "weight"]
        assert row["repair_reduction"]["weight"] == pytest.approx(1 - row["barrier"]["weight + REPAIR"] / base)
    _png(tmp_path / "barrier_vs_width_cnn-bn.png")
    _png(tmp_path / "barrier_vs_width_cnn-ln.png")


def test_ex03_cnn_families_refuse_images(load, tmp_path) -> None:
    with pytest.raises(DataError, match="1-D CNN"):
        load("ex03_rebasin_barriers").main(["--quick", "--quiet", "--families", "cnn-ln", "--output-dir", str(tmp_path)])


def test_ex04_writes_the_coverage_table_and_updates_the_readme_section(load, tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n<!-- coverage:start -->\nold\n<!-- coverage:end -->\n\nrest\n")
    results = load("ex04_zoo_equivalence").main(["--quiet", "--models", "squeezenet1_1", "shufflenet_v2_x0_5",
                                                 "--output-dir", str(tmp_path / "out"), "--update-readme", str(readme)])
    rows = {r["model"]: r for r in results["rows"]}
    assert rows["squeezenet1_1"]["max_rel_diff"] < 1e-5 and rows["squeezenet1_1"]["groups"] > 0
    shuffle = rows["shufflenet_v2_x0_5"]  # torch-pruning cannot trace it; the channel flow covers it
    assert shuffle["groups"] > 0 and shuffle["structural_diff"] <= 1e-9 and shuffle["skipped_by_kind"] == {"output": 1}
    text = readme.read_text()
    assert "old" not in text and text.startswith("# Title") and text.endswith("rest\n")
    assert "| squeezenet1_1 |" in text and "| shufflenet_v2_x0_5 |" in text and "| output 1 |" in text
    assert "| squeezenet1_1 |" in (tmp_path / "out" / "coverage.md").read_text()


def test_ex04_refuses_a_readme_without_markers_before_surveying(load, tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(DataError, match="lacks the markers"):
        load("ex04_zoo_equivalence").main(["--quiet", "--models", "resnet18", "--output-dir", str(tmp_path / "out"),
                                           "--update-readme", str(readme)])
    assert readme.read_text() == "no markers here\n"
    assert not (tmp_path / "out" / "coverage.json").exists()


def test_ex04_resume_reuses_the_rows_of_an_interrupted_run(load, tmp_path) -> None:
    module = load("ex04_zoo_equivalence")
    first = module.main(["--quiet", "--models", "squeezenet1_1", "--output-dir", str(tmp_path)])["rows"][0]
    again = module.main(["--quiet", "--resume", "--models", "squeezenet1_1", "mobilenet_v3_small",
                         "--output-dir", str(tmp_path)])["rows"]
    assert again[0] == first  # reused, not re-measured (the spec time would differ)
    assert again[1]["model"] == "mobilenet_v3_small" and again[1]["groups"] > 0


def test_experiment_scripts_report_bad_input_in_one_line(load, monkeypatch, capsys, tmp_path) -> None:
    module = load("ex03_rebasin_barriers")
    monkeypatch.setattr(sys, "argv", ["ex03", "--dataset", "cifar10", "--data-root", str(tmp_path / "absent"),
                                      "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        module.common.script_main(module.main)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cifar10") and err.count("\n") == 1


@pytest.mark.slow
def test_ex01_swaps_are_equivalent_and_curves_are_analysed(load, tmp_path) -> None:
    results = load("ex01_neuron_swap_curves").main(["--quick", "--quiet", "--output-dir", str(tmp_path)])
    assert list(results["depths"]) == ["early", "mid", "late"]
    for depth, row in results["depths"].items():
        assert row["verification"]["max_relative_difference"] < 1e-5
        assert 0.0 <= row["locality_at_midpoint"] <= 1.0
        folder = tmp_path / f"{depth}2"
        summary = json.loads((folder / "analysis_summary.json").read_text())
        assert summary["num_points"] == 11 and summary["metadata"]["layer"] == row["layer"]
        assert Image.open(folder / "layer_distances_evolution.gif").n_frames == 11
        _png(folder / "layer_distances_evolution_heatmap.png")
        assert json.loads((folder / "checkpoint_metadata.json").read_text())["neurons"] == row["neurons"]


def test_ex02_transplantation_study_covers_every_part(load, tmp_path) -> None:
    results = load("ex02_transplantation").main(["--quick", "--quiet", "--output-dir", str(tmp_path)])
    (mlp,) = results["families"].values()
    assert set(mlp["count"]) == {"2", "4"}
    assert len(mlp["order"]) == 4  # the wide model and three orders
    nt = mlp["count"]["2"]["transplant"]
    assert nt["after_ft"]["loss"] < nt["before_ft"]["loss"]  # sacrifice, then recover
    assert {r["method"] for r in mlp["methods"]} >= {"ensemble", "transplant", "transplant + ft"}
    _png(tmp_path / "recovery_mlp.png")
    _png(tmp_path / "count_mlp.png")


@pytest.mark.slow
def test_ex02_mnist1d_cnn_members_get_a_verdict_against_the_best_member(load, tmp_path, mnist1d_cache) -> None:
    results = load("ex02_transplantation").main(["--quick", "--quiet", "--dataset", "mnist1d", "--data-root",
                                                 mnist1d_cache, "--limit", "600", "--families", "cnn",
                                                 "--output-dir", str(tmp_path)])
    cnn = results["families"]["cnn"]
    assert cnn["architecture"].startswith("ResNet1d") and set(cnn["count"]) == {"2", "4"}
    assert set(cnn["count"]["2"]) == {"ensemble", "best member", "transplant", "average", "merge", "ot"}
    verdict = cnn["verdict"]["2"]
    assert verdict["nt_ft"] == cnn["count"]["2"]["transplant"]["after_ft"]["accuracy"]
    assert verdict["nt_ft_beats_best_member_ft"] == (verdict["nt_ft"] > verdict["best_member_ft"])
    assert cnn["order"]["merge -> prune -> ft (NT)"]["hidden"][0] == 8  # pruned back to the members' width
    _png(tmp_path / "count_cnn.png")


@pytest.mark.slow
def test_ex01_mnist1d_swaps_units_of_the_1d_cnn(load, tmp_path, mnist1d_cache) -> None:
    results = load("ex01_neuron_swap_curves").main(["--quick", "--quiet", "--dataset", "mnist1d", "--data-root",
                                                    mnist1d_cache, "--output-dir", str(tmp_path)])
    layers = [row["layer"] for row in results["depths"].values()]
    assert layers == ["conv1", "stages.1.0.conv2", "stages.2.0.conv2"]  # fusion.neuronswap.layer_at_depth
    for row in results["depths"].values():
        assert row["verification"]["max_relative_difference"] < 1e-5
        assert 0.0 <= row["locality_at_midpoint"] <= 1.0


@pytest.mark.slow
def test_ex05_stitching_and_cka_by_depth(load, tmp_path) -> None:
    results = load("ex05_stitching").main(["--quick", "--quiet", "--output-dir", str(tmp_path)])
    for row in results["rows"]:
        assert row["cka"]["A vs B"] == pytest.approx(row["cka"]["A vs aligned B"], abs=1e-6)  # CKA ignores permutations
        assert 0.0 <= row["stitch_linear"] <= 1.0
    _png(tmp_path / "stitching_by_depth.png")


@pytest.mark.slow
def test_ex06_transformer_fusion_reports_barriers_with_heads_on_and_off(load, tmp_path) -> None:
    results = load("ex06_transformer_fusion").main(["--quick", "--quiet", "--output-dir", str(tmp_path)])
    assert set(results["barrier"]) == {"naive", *(f"{m} (heads {s})" for m in ("weight", "activation")
                                                  for s in ("on", "off"))}
    assert results["groups"]["heads on"] > results["groups"]["heads off"] > 0
    labels = {row["method"] for row in results["fusion"]["2"]}
    assert {"ensemble", "merge-repair", "ot", "transplant", "transplant + ft"} <= labels
    assert all(row["loss"] < results["uniform_loss"] for row in results["fusion"]["2"])
    _png(tmp_path / "barriers.png")


def test_ex07_writes_the_transformers_coverage_table_into_the_readme(load, tmp_path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    readme = tmp_path / "README.md"
    readme.write_text("# T\n\n<!-- transformers:start -->\nold\n<!-- transformers:end -->\n")
    results = load("ex07_transformer_coverage").main(["--models", "gpt2", "llama", "--quiet", "--output-dir",
                                                      str(tmp_path / "out"), "--update-readme", str(readme)])
    rows = {r["model"]: r for r in results["rows"]}
    assert rows["llama"]["kinds"]["heads"] > 0 and rows["gpt2"]["kinds"]["head dims"] > 0
    assert results["worst_structural"] < 1e-5
    assert "| llama |" in readme.read_text() and "old" not in readme.read_text()
