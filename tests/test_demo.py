"""Specification of the demo (``fusion demo``) and the workbench it shares with the CLI and the experiments."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fusion.cli import main
from fusion.data import get_data, make_loaders
from fusion.demo import (
    FUSION_METHODS,
    MethodResult,
    compare_methods,
    format_table,
    fuse_models,
    measure,
    train_models,
)
from fusion.errors import DataError, EnsembleError
from fusion.models import MLP

METHOD_ROWS = ["best member", "ensemble", *FUSION_METHODS, "transplant + ft"]


@pytest.fixture(scope="module")
def small() -> dict:
    split = get_data("digits", seed=0, limit=160)
    train, test = make_loaders(split, batch_size=64, seed=0)
    members = train_models(lambda: MLP(hidden=(8,)), split, seeds=(0, 1), epochs=1, progress=False)
    return {"split": split, "train": train, "test": test, "members": members, "example": next(iter(train))[0][:4]}


def test_quick_demo_prints_the_comparison_and_writes_table_and_plots(tmp_path, capsys) -> None:
    assert main(["demo", "--quick", "-q", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "neuron transplantation + ft" in out and "loss barrier" in out
    results = json.loads((tmp_path / "demo_results.json").read_text())
    for family in ("MLP", "SmallResNet"):
        rows = [r for r in results["rows"] if r["family"] == family]
        assert [r["method"] for r in rows] == METHOD_ROWS
        assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in rows)
        assert sorted(results["barriers"][family]) == ["activation", "naive", "ot", "weight"]
        assert Image.open(tmp_path / f"interpolation_{family.lower()}.png").format == "PNG"
    assert (tmp_path / "demo_table.txt").read_text().startswith("Fusion of two models")


def test_train_models_is_reproducible_per_seed(small) -> None:
    again = train_models(lambda: MLP(hidden=(8,)), small["split"], seeds=(1,), epochs=1, progress=False)[0]
    first = small["members"][1].state_dict()
    assert all(torch.equal(first[k], v) for k, v in again.state_dict().items())
    assert not torch.equal(small["members"][0].layers[1].weight, small["members"][1].layers[1].weight)


def test_train_models_can_share_one_initialisation(small) -> None:
    untrained = train_models(lambda: MLP(hidden=(8,)), small["split"], seeds=(3, 4), epochs=0, init_seeds=(7, 7),
                             progress=False)
    assert torch.equal(untrained[0].layers[1].weight, untrained[1].layers[1].weight)


def test_train_models_needs_one_init_seed_per_model(small) -> None:
    with pytest.raises(DataError, match="init_seeds"):
        train_models(lambda: MLP(hidden=(8,)), small["split"], seeds=(1, 2), epochs=0, init_seeds=(1,))


@pytest.mark.parametrize("method", list(FUSION_METHODS))
def test_every_fusion_method_returns_a_model_of_the_members_architecture(small, method) -> None:
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in small["members"]]
    fused = fuse_models(method, small["members"], small["example"], small["train"], progress=False)
    assert isinstance(fused, MLP)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in before[0].items()}
    for model, state in zip(small["members"], before):  # members untouched
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_unknown_fusion_method_lists_the_known_ones(small) -> None:
    with pytest.raises(EnsembleError, match="merge-repair"):
        fuse_models("magic", small["members"], small["example"])


def test_compare_methods_adds_baselines_and_fine_tuned_rows(small) -> None:
    rows = compare_methods(small["members"], small["example"], small["train"], small["test"], methods=("average",),
                           finetune_methods=("best member", "transplant"), finetune_epochs=1, family="MLP",
                           progress=False)
    assert [r.method for r in rows] == ["best member", "ensemble", "average", "best member + ft", "transplant + ft"]
    assert rows[-1].label == "neuron transplantation + ft"
    assert rows[-1].seconds > 0


def test_compare_methods_rejects_unknown_methods(small) -> None:
    with pytest.raises(EnsembleError, match="unknown fusion method"):
        compare_methods(small["members"], small["example"], small["train"], small["test"], methods=("magic",))


def test_measure_returns_the_value_time_and_memory_growth() -> None:
    value, cost = measure(lambda n: torch.ones(n, n).sum().item(), 512)
    assert value == 512 * 512
    assert cost.seconds > 0 and cost.peak_memory_mb >= 0


def test_format_table_has_one_line_per_row_and_percentages() -> None:
    table = format_table([MethodResult("MLP", "merge", 0.975, 0.1), MethodResult("MLP", "ot + ft", 0.5, 1.0, 2.0)])
    lines = table.splitlines()
    assert len(lines) == 4
    assert "weight-matching merge" in lines[2] and "97.50" in lines[2]
    assert "OT fusion + ft" in lines[3]
