"""Specification of fusion.models: the reference MLP, VGG-style and ResNet-style (2-D and 1-D) networks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch_pruning as tp
from torch import nn

import fusion
from fusion.errors import CheckpointError
from fusion.models import MLP, MODELS, NORMS, ResNet1d, SmallResNet, VGGSmall, build_model


def test_mlp_maps_vectors_and_images_to_logits() -> None:
    model = MLP(in_features=64, hidden=(32, 16), num_classes=10)
    assert model(torch.randn(4, 64)).shape == (4, 10)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_mlp_default_is_three_hidden_layers_of_512() -> None:
    widths = [m.out_features for m in MLP().modules() if isinstance(m, nn.Linear)]
    assert widths == [512, 512, 512, 10]


def test_mlp_batch_norm_follows_each_hidden_linear() -> None:
    norms = [m for m in MLP(hidden=(8, 8), batch_norm=True).modules() if isinstance(m, nn.BatchNorm1d)]
    assert [m.num_features for m in norms] == [8, 8]


@pytest.mark.parametrize("size", [8, 16, 32])
def test_vgg_accepts_any_image_size(size: int) -> None:
    model = VGGSmall(in_channels=3, widths=(4, 8, 8, 8), num_classes=7)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_vgg_without_batch_norm_has_conv_biases() -> None:
    model = VGGSmall(widths=(4, 8), batch_norm=False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(c.bias is not None for c in convs)


def test_resnet_shortcut_is_conv_bn_only_where_shape_changes() -> None:
    model = SmallResNet(width=4, num_blocks=(2, 1, 1))
    blocks = [block for stage in model.stages for block in stage]
    kinds = [type(block.shortcut).__name__ for block in blocks]
    assert kinds == ["Identity", "Identity", "Sequential", "Sequential"]
    conv, norm = blocks[2].shortcut
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(norm, nn.BatchNorm2d)


def test_resnet_output_and_stage_widths() -> None:
    model = SmallResNet(in_channels=3, width=4, num_blocks=(1, 1, 1), num_classes=5)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert model.fc.in_features == 16


@pytest.mark.parametrize(
    ("name", "kwargs", "attribute"),
    [
        ("mlp", {"hidden": (10, 20)}, lambda m: [x.out_features for x in m.modules() if isinstance(x, nn.Linear)]),
        ("vgg", {"widths": (10, 20), "hidden": (30,)}, lambda m: [x.weight.shape[0] for x in m.modules()
                                                                    if isinstance(x, (nn.Conv2d, nn.Linear))]),
        ("resnet", {"width": 10}, lambda m: [m.conv1.out_channels, m.fc.in_features]),
    ],
)
def test_width_multiplier_scales_hidden_widths_only(name: str, kwargs: dict, attribute) -> None:
    base = attribute(build_model(name, **kwargs))
    wide = attribute(build_model(name, width_multiplier=2.0, **kwargs))
    if name == "resnet":
        assert wide == [2 * w for w in base]
    else:
        assert wide[:-1] == [2 * w for w in base[:-1]] and wide[-1] == base[-1] == 10


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("mlp", {"hidden": (8, 8)}), ("vgg", {"widths": (4, 8)}), ("resnet", {"width": 4, "num_blocks": (1, 2, 1)})],
)
def test_models_trace_with_fx_and_torch_pruning(name: str, kwargs: dict) -> None:
    model = build_model(name, **kwargs).eval()
    x = torch.randn(2, 1, 8, 8)
    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(x), model(x))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    assert len(list(graph.get_all_groups())) > 0


def test_build_model_knows_the_registry() -> None:
    assert set(MODELS) == {"mlp", "vgg", "resnet", "resnet1d"}
    assert isinstance(build_model("ResNet", width=4), SmallResNet)


def test_build_model_unknown_name_raises() -> None:
    with pytest.raises(CheckpointError, match="transformer"):
        build_model("transformer")


def test_width_multiplier_must_be_positive() -> None:
    with pytest.raises(ValueError, match="width_multiplier"):
        MLP(width_multiplier=0)


# --- ResNet1d: the 1-D residual CNN of the MNIST-1D studies ---


def _signals(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, 40)


def _redrawn_float64(model: nn.Module, seed: int = 0) -> nn.Module:
    """A float64 copy with every parameter and norm statistic re-drawn at O(1) scale (not the init's)."""
    generator = torch.Generator().manual_seed(seed)
    copy_ = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for name, tensor in [*copy_.named_parameters(), *copy_.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            low, high = (0.5, 2.0) if name.endswith("running_var") else (-1.0, 1.0)
            tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) * (high - low) + low)
    return copy_


@pytest.mark.parametrize("norm", NORMS)
def test_resnet1d_maps_signals_to_logits(norm: str) -> None:
    model = ResNet1d(width=4, num_blocks=(1, 2, 1), num_classes=7, norm=norm)
    assert model(_signals(3)).shape == (3, 7)


def test_resnet1d_norm_variants_use_batchnorm_groupnorm1_or_nothing() -> None:
    kinds = {norm: {type(m) for m in ResNet1d(width=4, norm=norm).modules()} for norm in NORMS}
    assert nn.BatchNorm1d in kinds["batch"] and nn.GroupNorm not in kinds["batch"]
    assert nn.GroupNorm in kinds["layer"] and nn.BatchNorm1d not in kinds["layer"]
    assert all(m.num_groups == 1 for m in ResNet1d(width=4, norm="layer").modules() if isinstance(m, nn.GroupNorm))
    assert not kinds["none"] & {nn.BatchNorm1d, nn.GroupNorm}
    for norm, biased in (("batch", False), ("layer", True), ("none", True)):
        convs = [m for m in ResNet1d(width=4, norm=norm).modules() if isinstance(m, nn.Conv1d)]
        assert all((c.bias is not None) == biased for c in convs)


def test_resnet1d_width_multiplier_scales_every_stage() -> None:
    base, wide = ResNet1d(width=4), ResNet1d(width=4, width_multiplier=3)
    assert [base.conv1.out_channels, base.fc.in_features] == [4, 16]
    assert [wide.conv1.out_channels, wide.fc.in_features] == [12, 48] and wide.fc.out_features == 10


def test_resnet_rejects_unknown_norm_and_dims() -> None:
    with pytest.raises(ValueError, match="norm"):
        ResNet1d(norm="instance")
    with pytest.raises(ValueError, match="dims"):
        SmallResNet(dims=3)


@pytest.mark.parametrize("norm", NORMS)
def test_resnet1d_spec_permutes_every_hidden_unit_and_keeps_the_function(norm: str) -> None:
    model = ResNet1d(width=4, num_blocks=(2, 1, 1), norm=norm).eval()
    x = _signals()
    spec = fusion.permutation_spec(model, x)
    assert [s.name for s in spec.skipped] == ["fc"]  # only the output units stay in place
    # Residual streams (stem + block outputs, with shortcuts) and block interiors: 3 + 4 groups.
    assert sorted(g.size for g in spec.groups) == [4, 4, 4, 8, 8, 16, 16]
    reference = _redrawn_float64(model)
    permuted = fusion.permute(reference, fusion.random_permutation(spec, seed=1), spec)
    with torch.no_grad():
        out, expected = permuted(x.double()), reference(x.double())
    assert float((out - expected).abs().max() / expected.abs().max()) < 1e-9
    moved = sum(int((a != b).sum()) for a, b in zip(reference.state_dict().values(), permuted.state_dict().values())
                if a.is_floating_point())
    total = sum(v.numel() for v in reference.state_dict().values() if v.is_floating_point())
    assert moved / total > 0.9


@pytest.mark.parametrize("method", ["weight", "activation", "ot"])
def test_resnet1d_alignment_recovers_a_permuted_copy(method: str) -> None:
    model = _redrawn_float64(ResNet1d(width=4, norm="layer")).float()
    x = _signals(16)
    spec = fusion.permutation_spec(model, x)
    scrambled = fusion.permute(model, fusion.random_permutation(spec, seed=3), spec)
    data = [_signals(32) for _ in range(2)] if method == "activation" else None
    aligned = fusion.align(model, scrambled, spec=spec, method=method, data=data, progress=False).model
    for key, value in model.state_dict().items():
        assert torch.allclose(aligned.state_dict()[key], value, atol=1e-6), key


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_resnet1d_repair_and_transplant_run_and_keep_the_architecture(norm: str) -> None:
    members = [ResNet1d(width=4, norm=norm).eval() for _ in range(2)]
    data = [(_signals(32), torch.randint(0, 10, (32,))) for _ in range(2)]
    midpoint = fusion.interpolate(members[0], members[1], 0.5)
    repaired = fusion.repair(midpoint, members, data, progress=False)
    assert repaired(_signals(2)).shape == (2, 10)
    fused = fusion.fuse_ensemble(members, _signals(4), progress=False)
    shapes = {k: tuple(v.shape) for k, v in members[0].state_dict().items()}
    assert {k: tuple(v.shape) for k, v in fused.state_dict().items()} == shapes
    assert str(fused) == str(members[0])  # same layers, GroupNorm(1, C) included


def test_resnet1d_traces_with_fx() -> None:
    model = ResNet1d(width=4, norm="layer").eval()
    x = _signals(2)
    assert torch.allclose(torch.fx.symbolic_trace(model)(x), model(x))
