"""Seed 002 (mode-connectivity neuron-swap study): the document's steps as ``fusion`` commands.

swap_neurons.py            -> fusion swap CKPT --output PATH --layer-depth D --num-swaps N --seed S [--no-verify]
(curve training, YAML)     -> fusion curve A B --config curve.yaml
analyze_neuron_swap_...py  -> fusion analyze-curve --curve-checkpoint --original-checkpoint --swap-metadata
                              --output-dir --num-points
plot_layer_distance_...py  -> fusion plot --data NPZ --output GIF --fps --metric --heatmap
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EQUIV_TOL
from hand_models import TinyVGG16
from PIL import Image

from fusion import verify_equivalence
from fusion.checkpoint import load_model, save_model
from fusion.cli import main
from fusion.data import get_data
from fusion.models import MLP
from fusion.neuronswap import layer_at_depth, layer_blocks

MLP_ARGS = ["--arch", "mlp", "--arch-kwargs", '{"hidden": [16, 16]}']
VGG_ARGS = ["--arch", "hand_models:TinyVGG16", "--image-size", "32"]
QUICK = ["--limit", "120", "-q"]


def run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def seed0(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("endpoints")
    return save_model(MLP(in_features=64, hidden=(16, 16), num_classes=10), folder / "checkpoint-200.pt")


@pytest.fixture(scope="module")
def study(seed0, tmp_path_factory) -> dict[str, Path]:
    """The document's steps 1-2 on an MLP: a mid swap, then a curve trained from a YAML config."""
    root = tmp_path_factory.mktemp("study")
    swapped = root / "endpoints_neuronswap" / "mid2" / "checkpoint-200.pt"
    assert main([str(a) for a in ["swap", seed0, *MLP_ARGS, *QUICK, "--output", swapped, "--layer-depth", "mid",
                                  "--num-swaps", 1, "--seed", 0]]) == 0
    config = root / "curve_neuronswap_mid2_reg.yaml"
    config.write_text("epochs: 1\nlr: 0.05\nweight_decay: 0.0005\nbends: 3\nseed: 1\nnum_points: 5\n")
    curve_dir = root / "curve_neuronswap_mid2_reg"
    assert main([str(a) for a in ["curve", seed0, swapped, *MLP_ARGS, *QUICK, "--config", config,
                                  "--output-dir", curve_dir]]) == 0
    return {"swapped": swapped, "metadata": swapped.with_name("checkpoint-200_metadata.json"), "curve": curve_dir}


def test_swap_verifies_on_the_whole_test_split_by_default(study) -> None:
    metadata = json.loads(study["metadata"].read_text())
    assert metadata["verification"]["passed"]
    assert metadata["verification"]["num_inputs"] == len(get_data("digits", seed=0, limit=120).test)


def test_no_verify_skips_the_check(seed0, tmp_path, capsys) -> None:
    code, out, _ = run(["swap", seed0, *MLP_ARGS, *QUICK, "--depth", "early", "--no-verify", "--output",
                        tmp_path / "s.pt"], capsys)
    assert code == 0 and "verify:" not in out
    assert "verification" not in json.loads((tmp_path / "s_metadata.json").read_text())


def test_num_swaps_swaps_that_many_disjoint_random_pairs(seed0, tmp_path, capsys) -> None:
    code, _, _ = run(["swap", seed0, *MLP_ARGS, *QUICK, "--layer", "layers.1", "--num-swaps", 5, "--seed", 3,
                      "--output", tmp_path / "s.pt"], capsys)
    assert code == 0
    metadata = json.loads((tmp_path / "s_metadata.json").read_text())
    assert metadata["num_swaps"] == 5 and len(set(metadata["neurons"])) == 10
    original = load_model(seed0, "mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[16, 16])
    swapped = load_model(tmp_path / "s.pt", "mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[16, 16])
    for i, j in metadata["pairs"]:
        assert torch.equal(swapped.layers[1].weight[i], original.layers[1].weight[j])
    assert verify_equivalence(original, swapped, torch.randn(16, 64)) < EQUIV_TOL


def test_more_swaps_than_units_allow_are_refused(seed0, tmp_path, capsys) -> None:
    code, _, err = run(["swap", seed0, *MLP_ARGS, *QUICK, "--layer", "layers.1", "--num-swaps", 9, "--output",
                        tmp_path / "s.pt"], capsys)
    assert code == 1 and "needs 18 units" in err


def test_depths_follow_the_document_block_and_layer_positions() -> None:
    model = TinyVGG16().eval()
    x = torch.randn(2, 1, 32, 32)
    blocks = layer_blocks(model, x)
    assert [len(b) for b in blocks] == [2, 2, 3, 3, 3]
    assert layer_at_depth(model, "early", x) == blocks[0][0]  # block 0, layer 0
    assert layer_at_depth(model, "mid", x) == blocks[2][1]  # block 2, layer 1
    assert layer_at_depth(model, "late", x) == blocks[4][1]  # block 4, layer 1


def test_swap_layer_depth_picks_the_same_convolution_on_the_command_line(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    checkpoint = save_model(TinyVGG16(), tmp_path / "vgg.pt")
    code, _, _ = run(["swap", checkpoint, *VGG_ARGS, *QUICK, "--layer-depth", "late", "--output",
                      tmp_path / "late2.pt"], capsys)
    assert code == 0
    metadata = json.loads((tmp_path / "late2_metadata.json").read_text())
    assert metadata["layer"] == layer_at_depth(TinyVGG16().eval(), "late", torch.randn(2, 1, 32, 32))
    assert metadata["depth"] == "late" and metadata["verification"]["passed"]


def test_curve_takes_epochs_lr_weight_decay_bends_and_seed_from_yaml(study) -> None:
    summary = json.loads((study["curve"] / "analysis_summary.json").read_text())
    assert {k: summary["metadata"][k] for k in ("epochs", "lr", "weight_decay", "num_bends", "seed")} == {
        "epochs": 1, "lr": 0.05, "weight_decay": 0.0005, "num_bends": 3, "seed": 1}
    assert summary["num_points"] == 5


def test_analyze_curve_rewrites_the_same_analysis_from_the_saved_curve(study, seed0, tmp_path, capsys) -> None:
    code, out, _ = run(["analyze-curve", *MLP_ARGS, *QUICK,
                        "--curve-checkpoint", study["curve"] / "curve.pt",
                        "--original-checkpoint", seed0,
                        "--swap-metadata", study["metadata"],
                        "--output-dir", tmp_path / "analysis",
                        "--num-points", 5, "--seed", 1], capsys)  # the curve's seed: the same data split
    assert code == 0 and "loss barrier" in out
    with np.load(study["curve"] / "layer_distances_along_curve.npz") as first, \
            np.load(tmp_path / "analysis" / "layer_distances_along_curve.npz") as again:
        assert sorted(first.files) == sorted(again.files)
        for name in ("normalized_l2", "relative", "raw_l2", "loss", "accuracy"):
            np.testing.assert_allclose(again[name], first[name], rtol=1e-5, atol=1e-7)
    summary = json.loads((tmp_path / "analysis" / "analysis_summary.json").read_text())
    assert summary["metadata"]["swap"]["layer"] == json.loads(study["metadata"].read_text())["layer"]
    assert (tmp_path / "analysis" / "layer_distances_evolution.gif").is_file()


def test_plot_writes_the_gif_named_by_output_and_its_heatmap(study, tmp_path, capsys) -> None:
    gif = tmp_path / "layer_distances_evolution.gif"
    code, _, _ = run(["plot", "--data", study["curve"] / "layer_distances_along_curve.npz", "--output", gif,
                      "--fps", 10, "--metric", "normalized_l2", "--heatmap", "-q"], capsys)
    assert code == 0
    assert Image.open(gif).n_frames == 5
    assert Image.open(tmp_path / "layer_distances_evolution_heatmap.png").format == "PNG"


def test_plot_output_is_not_read_as_output_dir(study, tmp_path, capsys) -> None:
    """Bug 4: argparse prefix matching used to take --output for --output-dir."""
    target = tmp_path / "file.gif"
    code, _, _ = run(["plot", study["curve"] / "layer_distances_along_curve.npz", "--output", target], capsys)
    assert code == 0 and target.is_file() and not (target / "layer_distances_along_curve.gif").exists()


@pytest.mark.parametrize("abbreviation", ["--output-d", "--num-sw", "--metr"])
def test_abbreviated_options_are_usage_errors(study, abbreviation, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(study["curve"] / "layer_distances_along_curve.npz"), abbreviation, "x"])
    assert exit_info.value.code == 2


def test_the_command_line_offers_exactly_the_library_depths() -> None:
    from fusion.cli.options import DEPTHS as CLI_DEPTHS
    from fusion.neuronswap import DEPTHS

    assert CLI_DEPTHS == DEPTHS
