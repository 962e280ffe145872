"""Alignment: recovery of known permutations, invariances, streamed statistics and bad input."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import EQUIV_TOL, WEIGHT_TOL
from hand_models import MLP, Residual, randomize_bn, tiny_vit

import fusion
from fusion.align.stats import PairStats
from fusion.errors import (
    AlignmentError,
    ArchitectureMismatchError,
    DataError,
    DeviceMismatchError,
    ExampleInputError,
    NonFiniteWeightsError,
    WidthMismatchError,
)


def max_state_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())


def scrambled(model, x, seed=7):
    spec = fusion.permutation_spec(model, x)
    return spec, fusion.permute(model, fusion.random_permutation(spec, seed=seed), spec)


ZOO = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "vit": tiny_vit,
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=10),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),
}
FAST = ["resnet18", "mobilenet_v2", "vit"]


def zoo_params():
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in ZOO]


@pytest.mark.parametrize("name", zoo_params())
@pytest.mark.parametrize("method", ["weight", "ot", "activation"])
def test_alignment_recovers_a_random_permutation_exactly(name, method):
    size = 16 if name == "vit" else 32
    x = torch.randn(2, 3, size, size)
    model = randomize_bn(ZOO[name](), x)
    spec, scrambled_model = scrambled(model, x)
    data = [torch.randn(64, 3, size, size) for _ in range(4)] if method == "activation" else None
    result = fusion.align(model, scrambled_model, spec=spec, method=method, data=data, progress=False)
    assert max_state_diff(model, result.model) <= WEIGHT_TOL


def test_aligning_a_model_with_itself_returns_the_identity():
    model, x = MLP((8, 16, 12, 4)), torch.randn(4, 8)
    result = fusion.align(model, model, x, progress=False)
    assert all(torch.equal(p, torch.arange(len(p))) for p in result.perms.values())
    assert result.iterations == 1 and result.cost == pytest.approx(result.history[-1])


def test_alignment_is_invariant_to_repermuting_b_first():
    x = torch.randn(2, 3, 8, 8)
    a, b = randomize_bn(Residual(), x), randomize_bn(Residual(), x)
    spec, b_scrambled = scrambled(b, x, seed=3)
    direct = fusion.align(a, b, spec=spec, progress=False)
    via_scrambled = fusion.align(a, b_scrambled, spec=spec, progress=False)
    assert max_state_diff(direct.model, via_scrambled.model) <= WEIGHT_TOL
    assert via_scrambled.cost == pytest.approx(direct.cost)


def test_aligned_model_computes_the_same_function_as_b():
    x = torch.randn(2, 3, 8, 8)
    a, b = randomize_bn(Residual(), x), randomize_bn(Residual(), x)
    for method in ["weight", "ot", "activation"]:
        result = fusion.align(a, b, x, method=method, data=torch.randn(32, 3, 8, 8), progress=False)
        assert fusion.verify_equivalence(b, result.model, x) <= EQUIV_TOL, method


def test_weight_matching_objective_never_decreases_and_beats_identity():
    a, b = MLP((8, 32, 32, 4)), MLP((8, 32, 32, 4))
    x = torch.randn(4, 8)
    result = fusion.align(a, b, x, progress=False, max_iter=50)
    assert all(later >= earlier - 1e-9 for earlier, later in zip(result.history, result.history[1:]))
    keys = {n for n, _ in a.named_parameters()}
    identity = sum(float((a.state_dict()[k] * b.state_dict()[k]).sum()) for k in keys)
    assert result.cost > identity


def test_inputs_are_untouched():
    x = torch.randn(2, 3, 8, 8)
    a, b = randomize_bn(Residual(), x), randomize_bn(Residual(), x)
    a.train()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    for method in ["weight", "activation", "ot"]:
        fusion.align(a, b, x, method=method, data=torch.randn(8, 3, 8, 8), progress=False)
    for model, state in zip((a, b), before):
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert a.training


def test_streamed_statistics_equal_the_one_batch_computation():
    torch.manual_seed(1)
    a, b = torch.randn(90, 5), torch.randn(90, 7)
    streamed, whole = PairStats(5, 7), PairStats(5, 7)
    for chunk in range(3):
        streamed.update(a[chunk * 30:(chunk + 1) * 30], b[chunk * 30:(chunk + 1) * 30])
    whole.update(a, b)
    assert torch.allclose(streamed.correlation(), whole.correlation(), atol=1e-12)
    expected = torch.corrcoef(torch.cat([a, b], dim=1).T.double())[:5, 5:]
    assert torch.allclose(whole.correlation(), expected, atol=1e-10)
    assert torch.allclose(whole.squared_distance(), ((a[:, :, None] - b[:, None, :]) ** 2).mean(0).double(), atol=1e-10)


def test_optimal_transport_handles_unequal_widths_with_transport_maps():
    a, b = MLP((8, 16, 12, 4)), MLP((8, 24, 20, 4))
    result = fusion.align(a, b, torch.randn(4, 8), method="ot", progress=False)
    assert {k: tuple(v.shape) for k, v in result.transport.items()} == {"layers.0": (16, 24), "layers.1": (12, 20)}
    assert result.perms == {}
    assert result.model.layers[0].weight.shape == (16, 8)
    for plan in result.transport.values():
        assert torch.allclose(plan.sum(1), torch.full((plan.shape[0],), 1 / plan.shape[0], dtype=plan.dtype))


def test_sinkhorn_alignment_of_a_permuted_copy_is_close_to_exact():
    model, x = MLP((8, 16, 12, 4)), torch.randn(4, 8)
    spec, scrambled_model = scrambled(model, x)
    result = fusion.align(model, scrambled_model, spec=spec, method="ot", solver="sinkhorn", reg=1e-3, progress=False)
    assert max_state_diff(model, result.model) <= WEIGHT_TOL


@pytest.mark.parametrize("reference", ["first", "mean"])
def test_align_many_brings_permuted_copies_into_one_basis(reference):
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(Residual(), x)
    spec = fusion.permutation_spec(model, x)
    copies = [model] + [fusion.permute(model, fusion.random_permutation(spec, seed=s), spec) for s in (1, 2)]
    results = fusion.align_many(copies, spec=spec, reference=reference, progress=False)
    assert len(results) == 3
    for result in results[1:]:
        assert max_state_diff(results[0].model, result.model) <= WEIGHT_TOL
    for original, result in zip(copies, results):
        assert fusion.verify_equivalence(original, result.model, x) <= EQUIV_TOL


def test_different_architectures_name_the_first_mismatch():
    with pytest.raises(ArchitectureMismatchError, match="layers"):
        fusion.align(MLP((8, 16, 4)), MLP((8, 16, 16, 4)), torch.randn(2, 8), progress=False)


def test_unequal_widths_with_a_hard_method_are_refused():
    with pytest.raises(WidthMismatchError, match=r"'layers.0.weight'.*method='ot'"):
        fusion.align(MLP((8, 16, 4)), MLP((8, 20, 4)), torch.randn(2, 8), progress=False)


@pytest.mark.parametrize("kwargs, message", [({"method": "magic"}, "Unknown method 'magic'"),
                                              ({"method": "ot", "cost": "bogus"}, "Unknown cost 'bogus'"),
                                              ({"method": "ot", "solver": "lp"}, "Unknown solver 'lp'")])
def test_unknown_choices_are_refused(kwargs, message):
    with pytest.raises(AlignmentError, match=message):
        fusion.align(MLP(), MLP(), torch.randn(2, 8), progress=False, **kwargs)


def test_activation_matching_needs_data():
    with pytest.raises(AlignmentError, match="needs data"):
        fusion.align(MLP(), MLP(), torch.randn(2, 8), method="activation", progress=False)
    with pytest.raises(DataError, match="no batches"):
        fusion.align(MLP(), MLP(), torch.randn(2, 8), method="activation", data=[], progress=False)


def test_data_the_model_rejects_is_reported():
    with pytest.raises(ExampleInputError, match=r"data of shape \(4, 5\)"):
        fusion.align(MLP(), MLP(), torch.randn(2, 8), method="activation", data=[torch.randn(4, 5)], progress=False)


def test_non_finite_weights_are_refused():
    b = MLP()
    with torch.no_grad():
        b.layers[1].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="model_b: 'layers.1.weight'"):
        fusion.align(MLP(), b, torch.randn(2, 8), progress=False)


def test_mixed_dtypes_are_refused():
    with pytest.raises(DeviceMismatchError, match="dtype"):
        fusion.align(MLP(), MLP().double(), torch.randn(2, 8), progress=False)
