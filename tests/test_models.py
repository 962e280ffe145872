"""Specification of fusion.models: the reference MLP, VGG-style and ResNet-style networks."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch_pruning as tp
from torch import nn

from fusion.errors import CheckpointError
from fusion.models import MLP, MODELS, SmallResNet, VGGSmall, build_model


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
    assert set(MODELS) == {"mlp", "vgg", "resnet"}
    assert isinstance(build_model("ResNet", width=4), SmallResNet)


def test_build_model_unknown_name_raises() -> None:
    with pytest.raises(CheckpointError, match="transformer"):
        build_model("transformer")


def test_width_multiplier_must_be_positive() -> None:
    with pytest.raises(ValueError, match="width_multiplier"):
        MLP(width_multiplier=0)
