"""Specification of fusion.fuse.transplant: Neuron Transplantation (concatenate, prune back, fine-tune)."""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import pytest
import torch
import torch_pruning as tp
from conftest import EQUIV_TOL
from test_concat import CASES, make_members, snapshot
from torch import nn

from fusion.errors import (
    ArchitectureMismatchError,
    DataError,
    DeviceMismatchError,
    EnsembleError,
    NonFiniteWeightsError,
)
from fusion.fuse.concat import build_concatenation
from fusion.fuse.transplant import fuse_ensemble, fuse_hierarchical, fuse_iterative
from fusion.fuse.transplant_importance import _importance
from fusion.fuse.transplant_prune import _out_axis, _Pruner, _top
from fusion.models import MLP
from fusion.spec import relative_difference


def prefer_low_positions(group) -> torch.Tensor:
    """An importance that ranks a layer's channels by position: member 0's units come first."""
    count = len(group[0].idxs)
    return torch.arange(count, 0, -1, dtype=torch.float32)


def assert_loads_into_member(fused: nn.Module, member: nn.Module) -> None:
    assert type(fused) is type(member)
    fresh = copy.deepcopy(member)
    fresh.load_state_dict(fused.state_dict(), strict=True)


TORCHVISION = ("resnet18", "mobilenet_v2")  # also covered, faster, by the consistency test below


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in TORCHVISION else n for n in CASES])
def test_fused_model_has_the_members_architecture(name: str) -> None:
    members, x = make_members(name, 2)
    fused = fuse_ensemble(members, x, progress=False)
    assert_loads_into_member(fused, members[0])
    with torch.no_grad():
        assert torch.isfinite(fused.eval()(x)).all()


def test_attention_heads_and_head_dim_are_restored() -> None:
    members, x = make_members("tiny_vit", 3)
    fused = fuse_ensemble(members, x, progress=False)
    for layer in fused.encoder.layers:
        attention = layer.self_attention
        assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (16, 2, 8)
    assert type(fused.encoder.ln) is nn.LayerNorm and fused.hidden_dim == 16


def test_grouped_convolution_and_group_norm_get_their_groups_back() -> None:
    members, x = make_members("grouped_groupnorm", 3)
    fused = fuse_ensemble(members, x, progress=False)
    assert (fused.grouped.groups, fused.grouped.in_channels, fused.grouped.out_channels) == (3, 12, 12)
    assert (fused.gn.num_groups, fused.gn.num_channels) == (3, 12)


def test_the_members_largest_neurons_are_the_ones_kept() -> None:
    members, x = make_members("mlp", 2)
    with torch.no_grad():  # member 1's first hidden layer gets 10x larger neurons
        members[1].layers[1].weight.mul_(10)
        members[1].layers[1].bias.mul_(10)
    fused = fuse_ensemble(members, x, progress=False)
    assert torch.equal(fused.layers[1].weight, members[1].layers[1].weight)
    assert torch.equal(fused.layers[1].bias, members[1].layers[1].bias)


def test_fusing_l1_importance_also_keeps_the_largest_neurons() -> None:
    members, x = make_members("mlp", 2)
    with torch.no_grad():
        members[0].layers[1].weight.mul_(10)
    fused = fuse_ensemble(members, x, importance="l1", progress=False)
    assert torch.equal(fused.layers[1].weight, members[0].layers[1].weight)


@pytest.mark.parametrize("name", ["mlp", "residual", "grouped_groupnorm", "resnet18", "mobilenet_v2"])
def test_units_kept_consistently_in_every_coupled_tensor(name: str) -> None:
    # An importance that prefers member 0's units everywhere must give back member 0's hidden
    # layers exactly, and its output layer at half weight (the ensemble's 1/N).
    members, x = make_members(name, 2)
    fused = fuse_ensemble(members, x, importance=prefer_low_positions, progress=False)
    wide_out = {k for k, v in fused.state_dict().items() if v.is_floating_point()}
    reference = members[0].state_dict()
    output_layer = [n for n, m in members[0].named_modules() if isinstance(m, nn.Linear)][-1]
    for key in wide_out:
        expected = reference[key]
        if key == f"{output_layer}.weight":
            expected = expected / 2
        elif key == f"{output_layer}.bias":
            expected = (expected + members[1].state_dict()[key]) / 2
        assert torch.allclose(fused.state_dict()[key], expected, atol=1e-7), key


@functools.cache
def concatenation(name: str) -> tuple:
    members, x = make_members(name, 2 if name == "resnet18" else 3)
    return build_concatenation(members, x), x


# resnet18: the benchmark's case; the others place members at scattered positions (flatten, attention)
# or hold grouped convolutions and GroupNorm.
BLOCK_CASES = ["resnet18", "concat_flatten", "tiny_vit", "grouped_groupnorm"]


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("name", BLOCK_CASES)
def test_block_magnitude_scores_equal_torch_pruning_group_magnitude(name: str, p: int) -> None:
    # "l1"/"l2" read each layer's |w|^p sums from the members' blocks of the concatenated model; on
    # every torch-pruning group they must give torch-pruning's GroupMagnitudeImportance scores.
    concat, x = concatenation(name)
    pruner = _Pruner(concat, x, _importance(f"l{p}"))
    reference = tp.importance.GroupMagnitudeImportance(p=p)
    producers = [(link, pruner._producer(link.group)) for link in concat.links]
    scored = [(link, producer) for link, producer in producers if producer is not None]
    assert scored
    for link, (layer, module, fn, _) in scored:
        group = pruner.graph.get_pruning_group(module, fn, list(range(module.weight.shape[_out_axis(module)])))
        ours, theirs = pruner.importance(group), reference(group)
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=0), layer
        if link.pattern == "units":
            assert torch.equal(_top(ours, link.keep), _top(theirs, link.keep)), layer


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("name", BLOCK_CASES)
def test_block_magnitude_keeps_the_units_torch_pruning_keeps(name: str, p: int) -> None:
    concat, x = concatenation(name)
    ours = _Pruner(concat, x, _importance(f"l{p}")).select()
    # a callable importance goes through torch-pruning; the spec-scored rest (attention heads) uses p
    theirs = _Pruner(concat, x, replace(_importance(tp.importance.GroupMagnitudeImportance(p=p)), p=p)).select()
    assert ours.keys() == theirs.keys()
    for group, kept in ours.items():
        assert torch.equal(kept, theirs[group]), group


def test_a_callable_importance_receives_the_torch_pruning_group() -> None:
    members, x = make_members("mlp", 2)
    received = []

    def importance(group) -> torch.Tensor:
        received.append(group)
        return prefer_low_positions(group)

    fuse_ensemble(members, x, importance=importance, progress=False)
    assert received and all(isinstance(group, tp.dependency.Group) for group in received)


def test_fusing_identical_models_gives_back_the_member() -> None:
    members, x = make_members("residual", 1)
    fused = fuse_ensemble([members[0], copy.deepcopy(members[0])], x, progress=False)
    fresh = torch.randn_like(x)
    with torch.no_grad():
        assert relative_difference(fused.eval()(fresh), members[0](fresh)) <= EQUIV_TOL


@pytest.mark.parametrize("fuse", [fuse_iterative, fuse_hierarchical])
def test_pairwise_schedules_return_the_member_architecture(fuse) -> None:
    members, x = make_members("residual", 4)
    fused = fuse(members, x, progress=False)
    assert_loads_into_member(fused, members[0])


def test_schedules_differ_for_four_members() -> None:
    members, x = make_members("mlp", 4)
    at_once = fuse_ensemble(members, x, progress=False)
    iterative = fuse_ensemble(members, x, schedule="iterative", progress=False)
    assert any(not torch.equal(v, iterative.state_dict()[k]) for k, v in at_once.state_dict().items())


def test_pairwise_schedules_weigh_every_member_equally() -> None:
    # With an importance that keeps member 0's units, every schedule ends with member 0's hidden
    # layers; the output bias is then the plain mean of the four members' biases.
    members, x = make_members("mlp", 4)
    mean_bias = sum(m.layers[-1].bias for m in members) / 4
    for schedule in ("iterative", "hierarchical"):
        fused = fuse_ensemble(members, x, importance=prefer_low_positions, schedule=schedule, progress=False)
        assert torch.allclose(fused.layers[-1].bias, mean_bias, atol=1e-6), schedule


def test_finetuning_trains_the_fused_model() -> None:
    members, x = make_members("mlp", 2)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 8, generator=generator)
    data = [(inputs[i:i + 16], (inputs[i:i + 16, 0] > 0).long()) for i in range(0, 64, 16)]
    plain = fuse_ensemble(members, x, progress=False)
    tuned = fuse_ensemble(members, x, finetune_data=data, finetune_epochs=2, lr=1e-2, progress=False)
    assert_loads_into_member(tuned, members[0])
    assert not torch.equal(plain.layers[1].weight, tuned.layers[1].weight)


def test_inputs_are_not_modified() -> None:
    members, x = make_members("tiny_vit", 2)
    before = [snapshot(m) for m in members]
    fuse_ensemble(members, x, progress=False)
    for model, state in zip(members, before):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key


# ---- bad input ---------------------------------------------------------------------------------


def test_single_model_is_rejected() -> None:
    members, x = make_members("mlp", 1)
    with pytest.raises(EnsembleError, match="fuse_ensemble needs at least two models, got 1"):
        fuse_ensemble(members, x, progress=False)


def test_different_architectures_are_rejected() -> None:
    members, x = make_members("mlp", 1)
    with pytest.raises(ArchitectureMismatchError, match=r"layers\.3\.weight"):
        fuse_ensemble([members[0], MLP(in_features=8, hidden=(16, 10), num_classes=4)], x, progress=False)


def test_members_with_different_dtypes_are_rejected() -> None:
    members, x = make_members("mlp", 2)
    with pytest.raises(DeviceMismatchError):
        fuse_ensemble([members[0], members[1].double()], x, progress=False)


def test_non_finite_weights_are_rejected() -> None:
    members, x = make_members("mlp", 2)
    with torch.no_grad():
        members[0].layers[-1].bias[0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"layers\.5\.bias"):
        fuse_ensemble(members, x, progress=False)


@pytest.mark.parametrize(("argument", "match"), [({"importance": "l3"}, "unknown importance"),
                                                 ({"schedule": "random"}, "unknown schedule")])
def test_unknown_options_are_rejected(argument: dict, match: str) -> None:
    members, x = make_members("mlp", 2)
    with pytest.raises(EnsembleError, match=match):
        fuse_ensemble(members, x, progress=False, **argument)


def test_finetuning_without_data_is_rejected() -> None:
    members, x = make_members("mlp", 2)
    with pytest.raises(DataError, match="finetune_data"):
        fuse_ensemble(members, x, finetune_epochs=1, progress=False)


def test_importance_with_the_wrong_number_of_scores_is_rejected() -> None:
    members, x = make_members("mlp", 2)
    with pytest.raises(EnsembleError, match="expected 32 finite scores"):
        fuse_ensemble(members, x, importance=lambda group: torch.ones(3), progress=False)
