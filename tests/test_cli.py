"""Specification of the ``fusion`` command line, run in-process through ``fusion.cli.main``."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EQUIV_TOL
from PIL import Image

from fusion import verify_equivalence
from fusion.checkpoint import architecture_metadata, load_model, save_model
from fusion.cli import main
from fusion.data import get_data, make_loaders
from fusion.evaluate import evaluate
from fusion.models import MLP, SmallResNet

MLP_ARGS = ["--arch", "mlp", "--arch-kwargs", '{"hidden": [16, 16]}']
QUICK = ["--limit", "120", "-q"]
COMMANDS = ("demo", "spec", "swap", "align", "fuse", "interpolate", "barrier", "distances", "curve", "analyze-curve",
            "plot")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    """Two MLP checkpoints (.pt) and two SmallResNet checkpoints (.safetensors naming their architecture)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for k in range(2):
        torch.manual_seed(k)
        paths[f"mlp{k}"] = save_model(MLP(in_features=64, hidden=(16, 16), num_classes=10), folder / f"mlp{k}.pt")
        torch.manual_seed(10 + k)
        paths[f"res{k}"] = save_model(SmallResNet(in_channels=1, width=2, num_classes=10),
                                      folder / f"res{k}.safetensors",
                                      metadata=architecture_metadata("resnet", width=2, num_classes=10))
    return paths


def run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _mlp(path: Path) -> torch.nn.Module:
    return load_model(path, "mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[16, 16])


def _test_loader():
    return make_loaders(get_data("digits", seed=0, limit=120), batch_size=128, seed=0)[1]


def test_spec_prints_groups_and_writes_their_coverage(ckpt, tmp_path, capsys) -> None:
    code, out, _ = run(["spec", ckpt["mlp0"], *MLP_ARGS, *QUICK, "--output-dir", tmp_path], capsys)
    assert code == 0
    assert "layers.1" in out and "coverage: 2 groups" in out
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert [g["name"] for g in spec["groups"]] == ["layers.1", "layers.3"]
    assert spec["coverage"]["max_rel_diff"] < EQUIV_TOL


def test_spec_of_a_fresh_model_traces_with_random_inputs_of_the_given_shape(capsys) -> None:
    code, out, _ = run(["spec", "--arch", "resnet", "--arch-kwargs", '{"width": 2, "in_channels": 3}',
                        "--input-shape", "3,16,16", "-q"], capsys)
    assert code == 0
    assert "PermutationSpec for SmallResNet: 6 groups" in out


def test_swap_saves_an_equivalent_model_and_names_the_swap(ckpt, tmp_path, capsys) -> None:
    code, out, _ = run(["swap", ckpt["mlp0"], *MLP_ARGS, *QUICK, "--layer", "layers.3", "--neurons", 2, 5, "--verify",
                        "--output-dir", tmp_path], capsys)
    assert code == 0 and "equivalent" in out
    swapped_path = tmp_path / "mlp0_swap_layers-3_2_5.pt"
    metadata = json.loads((tmp_path / "mlp0_swap_layers-3_2_5_metadata.json").read_text())
    assert metadata["layer"] == "layers.3" and metadata["neurons"] == [2, 5]
    assert metadata["tensors_moved"] == ["layers.3.weight", "layers.3.bias", "layers.5.weight"]
    assert metadata["verification"]["passed"] and metadata["verification"]["max_relative_difference"] < EQUIV_TOL
    original, swapped = _mlp(ckpt["mlp0"]), _mlp(swapped_path)
    assert torch.equal(swapped.layers[3].weight[2], original.layers[3].weight[5])
    assert verify_equivalence(original, swapped, torch.randn(32, 64)) < EQUIV_TOL


def test_swap_by_depth_picks_the_first_permutable_layer(ckpt, tmp_path, capsys) -> None:
    code, _, _ = run(["swap", ckpt["mlp0"], *MLP_ARGS, *QUICK, "--depth", "early", "--output", tmp_path / "s.pt"],
                     capsys)
    assert code == 0
    assert json.loads((tmp_path / "s_metadata.json").read_text())["layer"] == "layers.1"


def test_swap_of_a_unit_with_itself_is_refused(ckpt, tmp_path, capsys) -> None:
    code, _, err = run(["swap", ckpt["mlp0"], *MLP_ARGS, *QUICK, "--layer", "layers.1", "--neurons", 3, 3,
                        "--output-dir", tmp_path], capsys)
    assert code == 1 and "two different units" in err
    assert not any(tmp_path.iterdir())


def test_swap_needs_a_layer_or_a_depth(ckpt, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["swap", str(ckpt["mlp0"]), *MLP_ARGS])
    assert exit_info.value.code == 2


def test_align_writes_the_aligned_model_and_its_history(ckpt, tmp_path, capsys) -> None:
    code, _, _ = run(["align", ckpt["mlp0"], ckpt["mlp1"], *MLP_ARGS, *QUICK, "--method", "weight",
                      "--output-dir", tmp_path], capsys)
    assert code == 0
    summary = json.loads((tmp_path / "alignment.json").read_text())
    assert summary["method"] == "weight" and summary["iterations"] == len(summary["history"]) >= 1
    assert sorted(summary["perms"]) == ["layers.1", "layers.3"]
    aligned, model_b = _mlp(tmp_path / "aligned.pt"), _mlp(ckpt["mlp1"])
    assert verify_equivalence(model_b, aligned, torch.randn(32, 64)) < EQUIV_TOL


def test_align_reads_a_yaml_config_and_command_line_flags_win(ckpt, tmp_path, capsys) -> None:
    config = tmp_path / "align.yaml"
    config.write_text(f"models: [{ckpt['mlp0']}, {ckpt['mlp1']}]\narch: mlp\narch-kwargs: {{hidden: [16, 16]}}\n"
                      "method: ot\nlimit: 120\nquiet: true\n")
    code, _, _ = run(["align", "--config", config, "--method", "activation", "--output-dir", tmp_path], capsys)
    assert code == 0
    assert json.loads((tmp_path / "alignment.json").read_text())["method"] == "activation"


def test_config_values_are_checked_against_the_choices(ckpt, tmp_path, capsys) -> None:
    config = tmp_path / "fuse.json"
    config.write_text(json.dumps({"method": "bogus"}))
    code, _, err = run(["fuse", ckpt["mlp0"], ckpt["mlp1"], *MLP_ARGS, "--config", config], capsys)
    assert code == 1 and "'method' must be one of" in err


@pytest.mark.parametrize("method", ["average", "merge", "merge-repair", "ot", "transplant"])
def test_fuse_writes_the_fused_model_and_its_scores(ckpt, tmp_path, capsys, method) -> None:
    code, out, _ = run(["fuse", ckpt["mlp0"], ckpt["mlp1"], *MLP_ARGS, *QUICK, "--method", method,
                        "--output-dir", tmp_path], capsys)
    assert code == 0 and out.startswith(method)
    summary = json.loads((tmp_path / "fusion.json").read_text())
    assert summary["method"] == method and len(summary["members"]) == 2
    fused = evaluate(_mlp(tmp_path / "fused.pt"), _test_loader())
    assert summary["fused"]["accuracy"] == pytest.approx(fused.accuracy)
    assert summary["fused"]["loss"] == pytest.approx(fused.loss, rel=1e-5)


def test_fuse_reads_the_architecture_from_safetensors_metadata(ckpt, tmp_path, capsys) -> None:
    code, _, _ = run(["fuse", ckpt["res0"], ckpt["res1"], *QUICK, "--method", "merge-repair", "--output-dir", tmp_path],
                     capsys)
    assert code == 0
    fused = load_model(tmp_path / "fused.safetensors")  # the output names its architecture too
    assert isinstance(fused, SmallResNet)


def test_fuse_fine_tunes_when_asked(ckpt, tmp_path, capsys) -> None:
    code, out, _ = run(["fuse", ckpt["mlp0"], ckpt["mlp1"], *MLP_ARGS, *QUICK, "--method", "transplant",
                        "--finetune-epochs", 1, "--format", "safetensors", "--output-dir", tmp_path], capsys)
    assert code == 0 and "fine-tuning" in out
    summary = json.loads((tmp_path / "fusion.json").read_text())
    tuned = evaluate(load_model(tmp_path / "fused.safetensors"), _test_loader())
    assert summary["finetune"]["epochs"] == 1
    assert summary["finetune"]["accuracy"] == pytest.approx(tuned.accuracy)


@pytest.mark.parametrize("command", ["interpolate", "barrier"])
def test_interpolate_writes_naive_and_aligned_curves(ckpt, tmp_path, capsys, command) -> None:
    code, out, _ = run([command, ckpt["mlp0"], ckpt["mlp1"], *MLP_ARGS, *QUICK, "--align", "weight", "--steps", 3,
                        "--output-dir", tmp_path], capsys)
    assert code == 0 and "naive" in out
    curves = json.loads((tmp_path / "interpolation.json").read_text())["curves"]
    assert sorted(curves) == ["naive", "weight"]
    loader = _test_loader()
    assert curves["naive"]["loss"][0] == pytest.approx(evaluate(_mlp(ckpt["mlp0"]), loader).loss, rel=1e-5)
    assert curves["naive"]["loss"][-1] == pytest.approx(evaluate(_mlp(ckpt["mlp1"]), loader).loss, rel=1e-5)
    assert all(c["barrier"] >= 0 for c in curves.values())
    with np.load(tmp_path / "interpolation_weight.npz") as arrays:
        assert arrays["alphas"].tolist() == [0.0, 0.5, 1.0]
    for metric in ("loss", "accuracy"):
        assert Image.open(tmp_path / f"interpolation_{metric}.png").format == "PNG"


def test_distances_of_a_model_from_itself_are_zero(ckpt, tmp_path, capsys) -> None:
    code, _, _ = run(["distances", ckpt["mlp0"], ckpt["mlp0"], *MLP_ARGS, *QUICK, "--output-dir", tmp_path], capsys)
    assert code == 0
    summary = json.loads((tmp_path / "distances.json").read_text())
    assert summary["names"] == ["layers.1", "layers.3", "layers.5"]
    assert summary["raw_l2"] == [0.0, 0.0, 0.0]
    with np.load(tmp_path / "distances.npz") as arrays:
        assert arrays["normalized_l2"].shape == (3,)


def test_distances_after_alignment_are_smaller(ckpt, tmp_path, capsys) -> None:
    totals = {}
    for align in ([], ["--align", "weight"]):
        folder = tmp_path / ("aligned" if align else "raw")
        assert run(["distances", ckpt["mlp0"], ckpt["mlp1"], *MLP_ARGS, *QUICK, *align, "--output-dir", folder],
                   capsys)[0] == 0
        totals[folder.name] = sum(json.loads((folder / "distances.json").read_text())["raw_l2"])
    assert totals["aligned"] < totals["raw"]


def test_curve_writes_the_analysis_and_the_plots(ckpt, tmp_path, capsys) -> None:
    swap_dir = tmp_path / "swap"
    run(["swap", ckpt["mlp0"], *MLP_ARGS, *QUICK, "--layer", "layers.1", "--output", swap_dir / "s.pt"], capsys)
    code, out, _ = run(["curve", ckpt["mlp0"], swap_dir / "s.pt", *MLP_ARGS, *QUICK, "--epochs", 1, "--num-points", 5,
                        "--swap-metadata", swap_dir / "s_metadata.json", "--output-dir", tmp_path / "curve"], capsys)
    assert code == 0 and "Bezier curve" in out
    folder = tmp_path / "curve"
    summary = json.loads((folder / "analysis_summary.json").read_text())
    assert summary["num_points"] == 5 and summary["metadata"]["swap"]["layer"] == "layers.1"
    with np.load(folder / "layer_distances_along_curve.npz") as arrays:
        assert arrays["normalized_l2"].shape == (5, 3)
    assert Image.open(folder / "layer_distances_evolution.gif").n_frames == 5
    assert Image.open(folder / "layer_distances_evolution_heatmap.png").format == "PNG"


def test_plot_redraws_saved_results(ckpt, tmp_path, capsys) -> None:
    run(["interpolate", ckpt["mlp0"], ckpt["mlp1"], *MLP_ARGS, *QUICK, "--steps", 3, "--output-dir", tmp_path], capsys)
    code, _, _ = run(["plot", tmp_path / "interpolation.json", "--metric", "accuracy", "--output-dir",
                      tmp_path / "again", "-q"], capsys)
    assert code == 0
    assert (tmp_path / "again" / "interpolation_accuracy.png").is_file()


def test_plot_redraws_a_curve_as_heatmap_and_gif_at_the_requested_fps(ckpt, tmp_path, capsys) -> None:
    run(["curve", ckpt["mlp0"], ckpt["mlp1"], *MLP_ARGS, *QUICK, "--epochs", 0, "--num-points", 3, "--output-dir",
         tmp_path], capsys)
    code, _, _ = run(["plot", tmp_path / "layer_distances_along_curve.npz", "--metric", "relative", "--fps", 4,
                      "--output-dir", tmp_path / "again"], capsys)
    assert code == 0
    gif = Image.open(tmp_path / "again" / "layer_distances_along_curve.gif")
    assert gif.n_frames == 3 and gif.info["duration"] == 250
    assert (tmp_path / "again" / "layer_distances_along_curve_heatmap.png").is_file()


def test_plot_refuses_a_distance_metric_for_interpolation_curves(ckpt, tmp_path, capsys) -> None:
    run(["interpolate", ckpt["mlp0"], ckpt["mlp1"], *MLP_ARGS, *QUICK, "--steps", 2, "--output-dir", tmp_path], capsys)
    code, _, err = run(["plot", tmp_path / "interpolation_naive.npz", "--metric", "relative"], capsys)
    assert code == 1 and "use loss or accuracy" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["spec", "absent.pt", *MLP_ARGS], "does not exist"),
        (["spec", "{mlp0}", "--arch", "resnt18"], "unknown architecture 'resnt18'"),
        (["spec", "{junk}", *MLP_ARGS], "cannot read checkpoint"),
        (["spec", "{mlp0}", "--arch", "resnet"], "does not fit architecture 'resnet'"),
        (["fuse", "{mlp0}", "{mlp1}", *MLP_ARGS, "--dataset", "cifar10", "--data-root", "{missing}"], "does not exist"),
        (["fuse", "{mlp0}", *MLP_ARGS], "expected at least 2 checkpoints"),
        (["fuse", "--config", "{missing}", *MLP_ARGS], "config file"),
    ],
)
def test_bad_input_prints_one_error_line_and_exits_with_1(ckpt, tmp_path, capsys, args, message) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    names = {"{mlp0}": ckpt["mlp0"], "{mlp1}": ckpt["mlp1"], "{junk}": junk, "{missing}": tmp_path / "missing"}
    code, out, err = run([names.get(a, a) for a in args], capsys)
    assert code == 1
    assert err.startswith("fusion: error: ") and err.count("\n") == 1
    assert message in err and "Traceback" not in err


def test_unwritable_output_is_an_error_not_a_traceback(ckpt, tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(["fuse", ckpt["mlp0"], ckpt["mlp1"], *MLP_ARGS, *QUICK, "--output-dir", blocker / "sub"], capsys)
    assert code == 1 and err.startswith("fusion: error: cannot write")


def test_unknown_commands_are_usage_errors(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["transmogrify"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys, command) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    name = "interpolate" if command == "barrier" else command  # barrier is an alias of interpolate
    assert f"usage: fusion {name}" in capsys.readouterr().out


def test_quiet_commands_write_nothing_to_stderr(ckpt, tmp_path, capsys) -> None:
    code, _, err = run(["align", ckpt["mlp0"], ckpt["mlp1"], *MLP_ARGS, *QUICK, "--output-dir", tmp_path], capsys)
    assert code == 0 and err == ""


def test_the_package_main_module_runs_the_command_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["fusion", "--version"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("fusion", run_name="__main__")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("fusion ")


@pytest.mark.slow
def test_python_dash_m_fusion_runs_the_command_line() -> None:
    result = subprocess.run([sys.executable, "-m", "fusion", "--version"], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and result.stdout.startswith("fusion ")
