"""Specification of fusion.inspect.stitch: cutting models with torch.fx and fitting stitching layers."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fusion.errors import DataError, StitchError
from fusion.inspect.stitch import (
    StitchedModel,
    cut_points,
    fit_stitch,
    stitch,
)
from fusion.layers import LowRankLinear, ProcrustesLinear, RegressableLinear
from fusion.moments import CrossMoments

STITCH_TOL = 1e-4


def _cnn(width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    ).eval()


def _mlp(hidden: int = 24) -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, hidden), nn.Tanh(), nn.Linear(hidden, 20), nn.ReLU(), nn.Linear(20, 4)).eval()


def _batches(shape: tuple[int, ...], count: int = 4, size: int = 32, labels: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(size, *shape), torch.randint(0, labels, (size,))) for _ in range(count)]


def _relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _self_stitch_diff(model: nn.Module, layer: str, kind: str, shape: tuple[int, ...], **kwargs: object) -> float:
    data = _batches(shape, count=6)
    test = torch.randn(16, *shape)
    stitched = stitch(model, layer, model, layer, test[:2], stitch=kind, data=data, progress=False, **kwargs)
    with torch.no_grad():
        return _relative_diff(stitched(test), model(test))


# ----------------------------------------------------------------------------- self-stitching
@pytest.mark.parametrize("kind", ["linear", "procrustes"])
@pytest.mark.parametrize("layer", ["0", "1", "2", "3"])
def test_self_stitch_of_an_mlp_reproduces_its_outputs(kind: str, layer: str) -> None:
    assert _self_stitch_diff(_mlp(), layer, kind, (16,)) <= STITCH_TOL


@pytest.mark.parametrize("kind", ["linear", "procrustes"])
@pytest.mark.parametrize("layer", ["0", "1", "3", "4"])
def test_self_stitch_of_a_cnn_reproduces_its_outputs(kind: str, layer: str) -> None:
    assert _self_stitch_diff(_cnn(), layer, kind, (3, 6, 6)) <= STITCH_TOL


def test_full_rank_lowrank_self_stitch_reproduces_outputs() -> None:
    assert _self_stitch_diff(_mlp(), "2", "lowrank", (16,), rank=20) <= STITCH_TOL


def test_self_stitch_of_resnet18_reproduces_its_outputs() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    data = [(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)) for _ in range(3)]
    test = torch.randn(8, 3, 32, 32)
    stitched = stitch(model, "layer2", model, "layer2", test[:2], stitch="procrustes", data=data, progress=False)
    with torch.no_grad():
        assert _relative_diff(stitched(test), model(test)) <= STITCH_TOL


# --------------------------------------------------------------------------------- structure
def test_stitch_never_modifies_the_models() -> None:
    model_a, model_b = _cnn(), _cnn()
    before_a, before_b = _state(model_a), _state(model_b)
    stitched = stitch(model_a, "2", model_b, "2", torch.randn(2, 3, 6, 6), data=_batches((3, 6, 6)), progress=False)
    fit_stitch(stitched, _batches((3, 6, 6)), progress=False, finetune_epochs=1)
    for before, model in ((before_a, model_a), (before_b, model_b)):
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key])
        assert all(p.requires_grad for p in model.parameters())


def test_stitched_model_runs_a_front_a_stitch_and_b_back() -> None:
    model_a, model_b = _cnn(), _cnn(width=12)
    x = torch.randn(4, 3, 6, 6)
    stitched = stitch(model_a, "2", model_b, "2", x)
    assert isinstance(stitched, StitchedModel)
    assert isinstance(stitched.stitch_layer, RegressableLinear)
    assert (stitched.stitch_layer.in_features, stitched.stitch_layer.out_features) == (8, 12)
    with torch.no_grad():
        expected = model_b[3:](stitched.stitch_layer(model_a[:3](x)))
        assert torch.allclose(stitched(x), expected, atol=1e-6)
    assert sorted(n for n, p in stitched.named_parameters() if p.requires_grad) == ["stitch_layer.bias", "stitch_layer.weight"]


def test_linear_fit_equals_least_squares_on_all_features() -> None:
    model_a, model_b = _mlp(), _mlp(hidden=30)
    data = _batches((16,), count=5)
    stitched = fit_stitch(stitch(model_a, "1", model_b, "1", data[0][0]), data, progress=False)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        xa = torch.cat([model_a[:2](x), torch.ones(len(x), 1)], 1).double()
        yb = model_b[:2](x).double()
    solution = torch.linalg.lstsq(xa, yb).solution
    torch.testing.assert_close(stitched.stitch_layer.weight.double(), solution[:-1].T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stitched.stitch_layer.bias.double(), solution[-1], atol=1e-5, rtol=1e-4)


def test_fit_streams_batches_with_the_same_result_as_one_batch() -> None:
    model_a, model_b = _cnn(), _cnn(width=5)
    data = _batches((3, 6, 6), count=4, size=8)
    stitched = stitch(model_a, "2", model_b, "2", data[0][0])
    small = fit_stitch(stitched, data, progress=False)
    whole = fit_stitch(stitched, [(torch.cat([b[0] for b in data]), None)], progress=False)
    torch.testing.assert_close(small.stitch_layer.weight, whole.stitch_layer.weight, atol=1e-5, rtol=1e-4)
    assert small.fit_info.num_samples == whole.fit_info.num_samples == 4 * 8 * 36


def test_fit_returns_a_copy_unless_inplace() -> None:
    model = _mlp()
    stitched = stitch(model, "1", model, "1", torch.randn(2, 16))
    weight = stitched.stitch_layer.weight.clone()
    fitted = fit_stitch(stitched, _batches((16,)), progress=False)
    assert fitted is not stitched and torch.equal(stitched.stitch_layer.weight, weight) and stitched.fit_info is None
    assert fit_stitch(stitched, _batches((16,)), progress=False, inplace=True) is stitched
    assert 0.0 < stitched.fit_info.explained_variance <= 1.0 + 1e-9


def test_procrustes_fit_recovers_a_scaled_rotation_with_shift() -> None:
    x = torch.randn(500, 6, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    shift = torch.randn(6, dtype=torch.float64)
    moments = CrossMoments()
    moments.update(x, 2.5 * x @ rotation.T + shift)
    layer = ProcrustesLinear(6, 6).double().fit_moments(moments)
    torch.testing.assert_close(layer.weight_matrix(), 2.5 * rotation)
    torch.testing.assert_close(layer.bias, shift)


def test_procrustes_stitch_between_unequal_widths_is_semi_orthogonal() -> None:
    stitched = fit_stitch(stitch(_cnn(), "2", _cnn(width=12), "2", torch.randn(2, 3, 6, 6), stitch="procrustes",
                                 scale=False), _batches((3, 6, 6)), progress=False)
    weight = stitched.stitch_layer.weight_matrix().detach().double()
    torch.testing.assert_close(weight.T @ weight, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)


def test_lowrank_stitch_has_the_requested_rank_and_fits_no_better_than_linear() -> None:
    model_a, model_b = _mlp(), _mlp(hidden=30)
    data = _batches((16,), count=5)
    low = stitch(model_a, "1", model_b, "1", data[0][0], stitch="lowrank", rank=3, data=data, progress=False)
    full = stitch(model_a, "1", model_b, "1", data[0][0], stitch="linear", data=data, progress=False)
    assert isinstance(low.stitch_layer, LowRankLinear)
    assert int(torch.linalg.matrix_rank(low.stitch_layer.weight_matrix().detach())) == 3
    assert low.fit_info.explained_variance < full.fit_info.explained_variance


def test_finetuning_changes_only_the_stitch_and_reduces_the_task_loss() -> None:
    torch.manual_seed(1)
    model_a, model_b = _mlp(), _mlp(hidden=30)
    data = _batches((16,), count=4, labels=4)
    stitched = stitch(model_a, "1", model_b, "1", data[0][0], stitch="lowrank", rank=2, data=data, progress=False)
    frozen = {k: v for k, v in _state(stitched.model).items() if not k.startswith("stitch.")}
    tuned = fit_stitch(stitched, data, progress=False, finetune_epochs=8, lr=1e-2)
    losses = tuned.fit_info.finetune_losses
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert frozen and all(torch.equal(value, frozen[key]) for key, value in tuned.model.state_dict().items() if key in frozen)


def test_cut_points_of_resnet18_are_block_outputs() -> None:
    points = cut_points(torchvision.models.resnet18(num_classes=10))
    assert points[:6] == ["conv1", "bn1", "relu", "maxpool", "layer1.0", "layer1"]
    assert "layer2.0.conv1" not in points and points[-2:] == ["avgpool", "fc"]


# ---------------------------------------------------------------------------------- bad input
def test_unknown_layer_is_rejected() -> None:
    with pytest.raises(StitchError, match=r"layer_a: no layer named or matching 'conv9'"):
        stitch(_cnn(), "conv9", _cnn(), "2", torch.randn(2, 3, 6, 6))


def test_layer_bypassed_by_a_residual_connection_is_rejected() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(StitchError, match=r"layer_b='layer2.0.conv1' does not cut model_b"):
        stitch(model, "layer1", model, "layer2.0.conv1", torch.randn(2, 3, 32, 32))


def test_incompatible_spatial_shapes_are_rejected() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(StitchError, match=r"incompatible shapes: layer_a='layer1' gives \(2, 64, 8, 8\)"):
        stitch(model, "layer1", model, "layer2", torch.randn(2, 3, 32, 32))


def test_vector_to_map_stitch_is_rejected() -> None:
    with pytest.raises(StitchError, match="incompatible shapes"):
        stitch(_cnn(), "6", _cnn(), "2", torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize(
    ("kind", "rank", "message"),
    [("lowrank", None, "needs an int rank"), ("lowrank", 99, r"rank in 1\.\.20"), ("linear", 3, "only applies"),
     ("cca", None, "unknown stitch 'cca'")],
)
def test_bad_stitch_kind_or_rank_is_rejected(kind: str, rank: int | None, message: str) -> None:
    with pytest.raises(StitchError, match=message):
        stitch(_mlp(), "3", _mlp(), "3", torch.randn(2, 16), stitch=kind, rank=rank)


def test_fit_stitch_needs_a_stitched_model() -> None:
    with pytest.raises(StitchError, match="needs a StitchedModel"):
        fit_stitch(_mlp(), _batches((16,)), progress=False)


def test_task_finetuning_needs_labels() -> None:
    stitched = stitch(_mlp(), "1", _mlp(), "1", torch.randn(2, 16))
    with pytest.raises(DataError, match="needs \\(inputs, targets\\) batches"):
        fit_stitch(stitched, [torch.randn(8, 16)], progress=False, finetune_epochs=1)


def test_untraceable_model_is_rejected() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if x.sum() > 0 else x

    with pytest.raises(StitchError, match="needs a torch.fx graph of model_a"):
        stitch(Branchy(), "a", Branchy(), "a", torch.randn(2, 4))
