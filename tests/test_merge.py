"""Aligned merging and OT fusion."""

from __future__ import annotations

import pytest
import torch
from conftest import EQUIV_TOL
from hand_models import MLP, Residual, randomize_bn

import fusion
from fusion.errors import DataError, EnsembleError


@pytest.fixture(scope="module")
def residual_copies():
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(Residual(), x)
    spec = fusion.permutation_spec(model, x)
    copies = [model] + [fusion.permute(model, fusion.random_permutation(spec, seed=s), spec) for s in (1, 2)]
    return model, copies, spec, x


@pytest.mark.parametrize("reference", ["first", "mean"])
def test_merging_permuted_copies_returns_the_model(residual_copies, reference):
    model, copies, spec, x = residual_copies
    merged = fusion.merge(copies, spec=spec, reference=reference, progress=False)
    assert fusion.verify_equivalence(model, merged, x) <= EQUIV_TOL


def test_vanilla_average_of_permuted_copies_is_not_the_model(residual_copies):
    model, copies, _, x = residual_copies
    assert fusion.verify_equivalence(model, fusion.average(copies), x) > 1e-2


def test_merge_with_repair_and_reset_need_data(residual_copies):
    _, copies, spec, _ = residual_copies
    with pytest.raises(DataError, match="calibration data"):
        fusion.merge(copies, spec=spec, repair=True, progress=False)


def test_merge_with_repair_runs_on_calibration_data(residual_copies):
    model, copies, spec, x = residual_copies
    data = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    result = fusion.merge_with_alignments(copies, spec=spec, data=data, repair=True, progress=False)
    assert len(result.alignments) == 3
    assert fusion.verify_equivalence(model, result.model, x) <= 1e-4


def test_ot_fusion_of_permuted_copies_returns_the_model(residual_copies):
    model, copies, spec, x = residual_copies
    fused = fusion.ot_fusion(copies, spec=spec, progress=False)
    assert fusion.verify_equivalence(model, fused, x) <= EQUIV_TOL


def test_ot_fusion_of_unequal_widths_has_the_first_models_architecture():
    models = [MLP((8, 16, 12, 4)), MLP((8, 24, 20, 4)), MLP((8, 10, 30, 4))]
    fused = fusion.ot_fusion(models, torch.randn(4, 8), progress=False)
    fresh = MLP((8, 16, 12, 4))
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert fused(torch.randn(3, 8)).shape == (3, 4)


def test_ot_fusion_with_sinkhorn_and_activation_cost():
    models = [MLP((8, 16, 4)), MLP((8, 16, 4))]
    data = [torch.randn(32, 8) for _ in range(2)]
    fused = fusion.ot_fusion(models, data=data, cost="activation", reg=0.05, progress=False)
    assert all(torch.isfinite(p).all() for p in fused.parameters())


def test_ot_fusion_needs_two_models():
    with pytest.raises(EnsembleError, match="at least two models, got 1"):
        fusion.ot_fusion([MLP()], torch.randn(2, 8))


def test_merge_leaves_inputs_untouched(residual_copies):
    _, copies, spec, _ = residual_copies
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in copies]
    fusion.merge(copies, spec=spec, progress=False)
    fusion.ot_fusion(copies, spec=spec, progress=False)
    for model, state in zip(copies, before):
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
