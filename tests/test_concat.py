"""Specification of fusion.fuse.concat: one wide model computing the mean of the ensemble members."""

from __future__ import annotations

import copy

import hand_models as hm
import pytest
import torch
import torchvision
from conftest import EQUIV_TOL
from torch import nn

from fusion import permutation_spec
from fusion.errors import (
    ArchitectureMismatchError,
    DeviceMismatchError,
    EnsembleError,
    NonFiniteWeightsError,
    SpecMismatchError,
)
from fusion.fuse.concat import ConcatError, block_index, build_concatenation, concat_models, read_block
from fusion.fuse.layers import BlockLayerNorm
from fusion.models import MLP, VGGSmall
from fusion.spec import relative_difference

CASES = {
    "mlp": (lambda: MLP(in_features=8, hidden=(16, 12), num_classes=4), (4, 8)),
    "cnn_bn": (lambda: VGGSmall(in_channels=3, widths=(4, 8), hidden=(12,), num_classes=5), (2, 3, 8, 8)),
    "residual": (hm.Residual, (2, 3, 8, 8)),
    "concat_flatten": (hm.Concat, (2, 3, 8, 8)),
    "depthwise": (hm.Depthwise, (2, 3, 8, 8)),
    "grouped_groupnorm": (hm.Grouped, (2, 3, 8, 8)),
    "tiny_vit": (hm.tiny_vit, (2, 3, 16, 16)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32)),
}


def make_members(name: str, count: int) -> tuple[list[nn.Module], torch.Tensor]:
    """``count`` independently initialised members with non-trivial norm statistics, in eval mode."""
    build, shape = CASES[name]
    example = torch.randn(*shape)
    members = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = build()
        hm.randomize_bn(model, example)
        with torch.no_grad():  # torchvision's ViT starts with an all-zero head: give it weights
            for module in model.modules():
                if isinstance(module, nn.Linear) and not module.weight.any():
                    module.weight.normal_(0, 0.2)
                    module.bias.normal_(0, 0.2)
        members.append(model.eval())
    return members, example


def ensemble_mean(models: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sum(m(x) for m in models) / len(models)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(CASES))
def test_concatenation_computes_the_ensemble_mean(name: str) -> None:
    members, x = make_members(name, 2)
    wide = concat_models(members, x)
    with torch.no_grad():
        assert relative_difference(wide.eval()(x), ensemble_mean(members, x)) <= EQUIV_TOL


@pytest.mark.parametrize("name", ["mlp", "residual", "grouped_groupnorm", "tiny_vit"])
def test_concatenation_of_three_computes_their_mean_on_new_inputs(name: str) -> None:
    members, x = make_members(name, 3)
    wide = concat_models(members, x)
    fresh = torch.randn_like(x)
    with torch.no_grad():
        assert relative_difference(wide.eval()(fresh), ensemble_mean(members, fresh)) <= EQUIV_TOL


def test_every_hidden_width_is_multiplied_and_input_and_output_kept() -> None:
    members, x = make_members("mlp", 3)
    wide = concat_models(members, x)
    first, second, out = (m for m in wide.modules() if isinstance(m, nn.Linear))
    assert (first.in_features, first.out_features) == (8, 48)
    assert (second.in_features, second.out_features) == (48, 36)
    assert (out.in_features, out.out_features) == (36, 4)
    assert type(wide) is type(members[0])


def test_hidden_weights_are_block_diagonal_copies_of_the_members() -> None:
    members, x = make_members("mlp", 2)
    wide = concat_models(members, x)
    weight = wide.layers[3].weight  # Linear(32 -> 24) of MLP's Sequential: flatten, linear, relu, linear
    a, b = members[0].layers[3].weight, members[1].layers[3].weight
    assert torch.equal(weight[:12, :16], a) and torch.equal(weight[12:, 16:], b)
    assert not weight[:12, 16:].any() and not weight[12:, :16].any()


@pytest.mark.parametrize("name", ["mlp", "concat_flatten", "grouped_groupnorm", "tiny_vit", "resnet18"])
def test_each_member_is_one_block_of_every_wide_tensor_and_the_rest_is_zero(name: str) -> None:
    count = 2 if name == "resnet18" else 3
    members, x = make_members(name, count)
    concat = build_concatenation(members, x)
    state = concat.model.state_dict()
    for key in {key for key, _ in concat.positions}:
        wide, nonzero = state[key], 0
        for k, member in enumerate(members):
            block = read_block(wide, block_index(concat.positions, key, wide.dim(), k))
            expected = member.state_dict()[key]
            assert torch.equal(block, expected) or torch.equal(block, expected * (1 / count)), (key, k)
            nonzero += int(block.count_nonzero())
        assert int(wide.count_nonzero()) == nonzero, key


def test_output_layer_averages_the_members_contributions() -> None:
    members, x = make_members("mlp", 2)
    wide = concat_models(members, x)
    out, a, b = wide.layers[-1], members[0].layers[-1], members[1].layers[-1]
    assert torch.allclose(out.weight, torch.cat([a.weight, b.weight], dim=1) / 2)
    assert torch.allclose(out.bias, (a.bias + b.bias) / 2)


def test_attention_keeps_head_dim_and_layer_norms_normalise_each_member() -> None:
    members, x = make_members("tiny_vit", 2)
    wide = concat_models(members, x)
    attention = wide.encoder.layers[0].self_attention
    assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (32, 4, 8)
    assert isinstance(wide.encoder.ln, BlockLayerNorm) and wide.encoder.ln.num_blocks == 2
    assert wide.class_token.shape == (1, 1, 32) and wide.hidden_dim == 32


def test_grouped_convolution_and_group_norm_get_a_group_set_per_member() -> None:
    members, x = make_members("grouped_groupnorm", 2)
    wide = concat_models(members, x)
    assert (wide.grouped.groups, wide.grouped.in_channels, wide.grouped.out_channels) == (6, 24, 24)
    assert (wide.gn.num_groups, wide.gn.num_channels) == (6, 24)


def test_depthwise_convolution_stays_depthwise() -> None:
    members, x = make_members("depthwise", 2)
    conv = concat_models(members, x).dw[0]
    assert conv.groups == conv.in_channels == conv.out_channels == 24


def test_precomputed_spec_gives_the_same_model() -> None:
    members, x = make_members("residual", 2)
    spec = permutation_spec(members[0], x)
    with_spec, without = concat_models(members, x, spec=spec), concat_models(members, x)
    for key, value in without.state_dict().items():
        assert torch.equal(value, with_spec.state_dict()[key]), key


def test_inputs_are_not_modified() -> None:
    members, x = make_members("tiny_vit", 2)
    before = [snapshot(m) for m in members]
    concat_models(members, x)
    for model, state in zip(members, before):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
        assert not model.training


def test_block_layer_norm_equals_a_layer_norm_per_block() -> None:
    norm = BlockLayerNorm(4, 3)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(5, 12)
    expected = torch.cat([
        nn.functional.layer_norm(x[:, 4 * i:4 * i + 4], (4,), norm.weight[4 * i:4 * i + 4], norm.bias[4 * i:4 * i + 4])
        for i in range(3)
    ], dim=1)
    assert torch.allclose(norm(x), expected, atol=1e-6)


# ---- bad input ---------------------------------------------------------------------------------


def test_single_model_is_rejected() -> None:
    members, x = make_members("mlp", 1)
    with pytest.raises(EnsembleError, match="concat_models needs at least two models, got 1"):
        concat_models(members, x)


def test_different_architectures_name_the_first_differing_parameter() -> None:
    members, x = make_members("mlp", 1)
    other = MLP(in_features=8, hidden=(16, 10), num_classes=4)
    with pytest.raises(ArchitectureMismatchError, match=r"layers\.3\.weight.*\(12, 16\).*\(10, 16\)"):
        concat_models([members[0], other], x)


def test_members_with_different_dtypes_are_rejected() -> None:
    members, x = make_members("mlp", 2)
    with pytest.raises(DeviceMismatchError, match="dtype"):
        concat_models([members[0], members[1].double()], x)


def test_non_finite_weights_are_rejected() -> None:
    members, x = make_members("mlp", 2)
    with torch.no_grad():
        members[1].layers[1].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"layers\.1\.weight"):
        concat_models(members, x)


def test_spec_of_another_architecture_is_rejected() -> None:
    members, x = make_members("mlp", 2)
    spec = permutation_spec(MLP(in_features=8, hidden=(16, 10), num_classes=4), x)
    with pytest.raises(SpecMismatchError):
        concat_models(members, x, spec=spec)


def seeded(build, count: int = 2) -> list[nn.Module]:
    """``count`` models built after seeding with 0, 1, ..."""
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        models.append(build())
    return models


def test_tied_input_and_output_embedding_is_untied_in_the_concatenation() -> None:
    members, x = seeded(hm.TiedEmbedding), torch.randint(0, 11, (2, 5))
    wide = concat_models(members, x)
    assert wide.head.weight is not wide.embed.weight
    with torch.no_grad():
        mean = sum(m(x) for m in members) / len(members)
        assert torch.allclose(wide(x), mean, atol=1e-5)
    assert members[0].head.weight is members[0].embed.weight


def test_units_outside_every_permutation_group_name_their_layer() -> None:
    # torch-pruning's spec alone refuses the chunked conv (the channel flow would give one group per chunk)
    members, x = seeded(hm.Chunk), torch.randn(2, 3, 8, 8)
    with pytest.raises(ConcatError, match=r"layer 'conv'.*'conv\.weight'"):
        concat_models(members, x, spec=permutation_spec(members[0], x, channel_flow=False))


def test_a_failed_concatenation_leaves_the_inputs_untouched() -> None:
    members = seeded(hm.Chunk)
    before = [snapshot(m) for m in members]
    with pytest.raises(ConcatError):
        concat_models(copy.copy(members), torch.randn(2, 3, 8, 8))
    for model, state in zip(members, before):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class DataDependentMLP(hm.MLP):
    """An MLP whose forward reads a tensor value (so it cannot be traced on the meta device)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if float(x.abs().max()) < 1e6 else 1e-6
        return super().forward(x * scale)


def test_models_that_cannot_run_on_the_meta_device_are_traced_with_real_tensors() -> None:
    members = seeded(DataDependentMLP)
    x = torch.randn(4, 8)
    wide = concat_models(members, x)
    with torch.no_grad():
        assert relative_difference(wide(x), ensemble_mean(members, x)) <= EQUIV_TOL


class SoftmaxMLP(hm.MLP):
    """An MLP returning probabilities: their mean is not the softmax of the averaged logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(super().forward(x), dim=1)


def test_a_non_linear_output_is_reported_instead_of_a_wrong_model() -> None:
    with pytest.raises(ConcatError, match="does not reproduce the ensemble mean"):
        concat_models(seeded(SoftmaxMLP), torch.randn(4, 8))
