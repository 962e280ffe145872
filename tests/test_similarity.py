"""Specification of fusion.analysis.similarity: streamed CKA, Procrustes distance and matched correlation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from fusion.analysis.similarity import (
    SimilarityResult,
    linear_cka,
    linear_cka_from_features,
    matched_correlation,
    matched_correlation_from_features,
    procrustes_distance,
    procrustes_distance_from_features,
    representation_similarity,
)
from fusion.errors import DataError, FusionError

LAYERS = ["0", "1", "2", "3", "4"]


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _permuted(model: nn.Sequential) -> tuple[nn.Sequential, torch.Tensor]:
    """A copy of the MLP with its 32 first-layer hidden neurons reordered by hand (same function)."""
    perm = torch.randperm(32)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.copy_(model[0].weight[perm])
        other[0].bias.copy_(model[0].bias[perm])
        other[2].weight.copy_(model[2].weight[:, perm])
    return other, perm


def _data(count: int = 4, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(size, 10), torch.zeros(size, dtype=torch.long)) for _ in range(count)]


def _gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA through n x n centered Gram matrices (Kornblith et al., 2019, eq. for HSIC)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l_).sum() / (k.norm() * l_.norm()))


# ------------------------------------------------------------------------------------ CKA bars
def test_cka_of_a_model_with_itself_is_one() -> None:
    model = _mlp()
    result = linear_cka(model, model, _data(), LAYERS)
    assert result.layers == tuple((n, n) for n in LAYERS)
    assert all(abs(v - 1.0) < 1e-9 for v in result.values)


def test_cka_with_a_hand_permuted_copy_is_one() -> None:
    model = _mlp()
    other, _ = _permuted(model)
    x = torch.randn(4, 10)
    torch.testing.assert_close(other(x), model(x))
    result = linear_cka(model, other, _data(), LAYERS)
    assert all(abs(v - 1.0) < 1e-6 for v in result.values)


def test_cka_with_an_unrelated_model_is_below_one() -> None:
    result = linear_cka(_mlp(), _mlp(), _data(), ["1", "3"])
    assert all(0.0 < v < 0.95 for v in result.values)


def test_cka_from_moments_equals_the_gram_matrix_formula() -> None:
    x, y = torch.randn(60, 7, dtype=torch.float64), torch.randn(60, 5, dtype=torch.float64)
    y = y + x[:, :5]
    assert linear_cka_from_features(x, y) == pytest.approx(_gram_cka(x, y), abs=1e-12)


def test_streaming_over_batches_equals_one_batch() -> None:
    model_a, model_b = _mlp(), _mlp()
    data = _data(count=5, size=16)
    streamed = linear_cka(model_a, model_b, data, "3").values[0]
    whole = torch.cat([b[0] for b in data])
    with torch.no_grad():
        direct = linear_cka_from_features(model_a[:4](whole), model_b[:4](whole))
    assert streamed == pytest.approx(direct, abs=1e-10)


def test_conv_maps_count_positions_as_samples_unless_flatten_full() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    other = torchvision.models.resnet18(num_classes=10).eval()
    data = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    spatial = linear_cka(model, other, data, "layer1")
    full = linear_cka(model, other, data, "layer1", flatten="full")
    assert spatial.num_samples == (8 * 8 * 8,) and full.num_samples == (8,)
    x = torch.cat(data)
    with torch.no_grad():
        fa = nn.Sequential(*list(model.children())[:5])(x)
        fb = nn.Sequential(*list(other.children())[:5])(x)
    assert spatial.values[0] == pytest.approx(linear_cka_from_features(fa, fb), abs=1e-9)
    assert full.values[0] == pytest.approx(linear_cka_from_features(fa, fb, flatten="full"), abs=1e-9)


def test_cka_of_resnet18_with_itself_is_one_at_every_stage() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    result = linear_cka(model, model, [torch.randn(4, 3, 32, 32)], r"layer\d")
    assert [a for a, _ in result.layers] == ["layer1", "layer2", "layer3", "layer4"]
    assert all(abs(v - 1.0) < 1e-9 for v in result.values)


# --------------------------------------------------------------------------- other measures
def test_procrustes_distance_is_zero_for_permuted_copies_and_positive_otherwise() -> None:
    model = _mlp()
    other, _ = _permuted(model)
    same = procrustes_distance(model, other, _data(), ["0", "2"])
    different = procrustes_distance(model, _mlp(), _data(), ["0", "2"])
    assert all(v < 1e-3 for v in same.values)
    assert all(0.05 < v <= math.sqrt(2) for v in different.values)


def test_procrustes_distance_is_invariant_to_rotation_and_scale() -> None:
    x = torch.randn(100, 6, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    assert procrustes_distance_from_features(x, 3.0 * x @ rotation + 1.0) == pytest.approx(0.0, abs=1e-6)
    assert procrustes_distance_from_features(x, torch.randn(100, 6, dtype=torch.float64)) > 0.5


def test_matched_correlation_is_one_for_a_permuted_copy() -> None:
    model = _mlp()
    other, _ = _permuted(model)
    result = matched_correlation(model, other, _data(), ["0", "2"])
    assert all(abs(v - 1.0) < 1e-6 for v in result.values)
    assert all(v < 0.9 for v in matched_correlation(model, _mlp(), _data(), ["0", "2"]).values)


def test_matched_correlation_pairs_neurons_by_assignment() -> None:
    x = torch.randn(200, 5, dtype=torch.float64)
    perm = torch.tensor([3, 0, 4, 1, 2])
    noisy = x[:, perm] + 0.1 * torch.randn(200, 5, dtype=torch.float64)
    expected = torch.stack([torch.corrcoef(torch.stack([x[:, perm[j]], noisy[:, j]]))[0, 1] for j in range(5)]).mean()
    assert matched_correlation_from_features(x, noisy) == pytest.approx(float(expected), abs=1e-9)


def test_representation_similarity_computes_all_measures_in_one_pass() -> None:
    model = _mlp()
    results = representation_similarity(model, model, _data(), ["1", "3"])
    assert set(results) == {"linear_cka", "procrustes_distance", "matched_correlation"}
    assert isinstance(results["linear_cka"], SimilarityResult)
    assert results["linear_cka"]["3"] == pytest.approx(1.0)
    assert results["procrustes_distance"].as_dict()[("1", "1")] == pytest.approx(0.0, abs=1e-6)


def test_layers_b_pairs_different_layers() -> None:
    model = _mlp()
    result = linear_cka(model, model, _data(), ["1", "3"], ["3", "1"])
    assert result.layers == (("1", "3"), ("3", "1"))
    assert result.values[0] == pytest.approx(result.values[1]) and result.values[0] < 1.0


def test_similarity_leaves_the_models_untouched() -> None:
    model = torchvision.models.resnet18(num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linear_cka(model, model, [torch.randn(4, 3, 32, 32)], "layer1")
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_untraceable_models_are_compared_through_hooks() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(10, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if x.sum() > -1e9 else x

    model = Branchy()
    assert linear_cka(model, model, _data(), "a").values[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------- bad input
def test_unknown_layer_is_rejected() -> None:
    with pytest.raises(FusionError, match="layers_a: no layer named or matching 'fc9'"):
        linear_cka(_mlp(), _mlp(), _data(), "fc9")


def test_unequal_numbers_of_layers_are_rejected() -> None:
    with pytest.raises(FusionError, match=r"layers_a resolves to 2 layer\(s\) \(1, 3\) but layers_b to 1"):
        linear_cka(_mlp(), _mlp(), _data(), ["1", "3"], ["1"])


def test_different_spatial_sizes_need_flatten_full() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(DataError, match="flatten='full'"):
        linear_cka(model, model, [torch.randn(2, 3, 32, 32)], "layer1", "layer2")


def test_too_wide_layers_are_rejected() -> None:
    with pytest.raises(DataError, match="above max_features=16"):
        linear_cka(_mlp(), _mlp(), _data(), "1", max_features=16)


def test_empty_data_is_rejected() -> None:
    with pytest.raises(DataError, match="yielded no batches"):
        linear_cka(_mlp(), _mlp(), [], "1")
