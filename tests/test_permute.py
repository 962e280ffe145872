"""permute / swap_neurons / permute_layer / verify_equivalence: behaviour and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from conftest import EQUIV_TOL
from hand_models import MLP, Residual, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fusion
from fusion.errors import DeviceMismatchError, PermutationError


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def residual():
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(Residual(), x)
    return model, x, fusion.permutation_spec(model, x)


class ConvNet(nn.Module):
    def __init__(self, widths):
        super().__init__()
        chans = [3, *widths]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in widths)
        self.fc = nn.Linear(widths[-1] * 4, 3)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


@settings(max_examples=12, deadline=None)
@given(
    widths=st.lists(st.integers(2, 9), min_size=1, max_size=3),
    conv=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_permute_then_inverse_returns_the_exact_state_dict(widths, conv, seed):
    model = ConvNet(widths) if conv else MLP((5, *widths, 3))
    x = torch.randn(2, 3, 6, 6) if conv else torch.randn(2, 5)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = fusion.permutation_spec(model, x)
    perms = fusion.random_permutation(spec, seed=seed)
    permuted = fusion.permute(model, perms, spec)
    assert fusion.verify_equivalence(model, permuted, x) <= EQUIV_TOL
    restored = fusion.permute(permuted, fusion.inverse_permutation(perms), spec)
    assert state_equal(model, restored)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched


@settings(max_examples=10, deadline=None)
@given(i=st.integers(0, 7), j=st.integers(0, 7))
def test_swapping_twice_is_the_identity(i, j):
    model = MLP((4, 8, 6, 2)).eval()
    x = torch.randn(3, 4)
    spec = fusion.permutation_spec(model, x)
    once = fusion.swap_neurons(model, "layers.0", i, j, spec=spec)
    twice = fusion.swap_neurons(once, "layers.0", i, j, spec=spec)
    assert state_equal(model, twice)
    assert fusion.verify_equivalence(model, once, x) <= EQUIV_TOL


def test_swap_moves_rows_and_columns_of_the_neighbouring_layers():
    model = MLP((4, 5, 3)).eval()
    swapped = fusion.swap_neurons(model, "layers.0", 1, 3, torch.randn(2, 4))
    w0, w1 = model.layers[0].weight, model.layers[1].weight
    assert torch.equal(swapped.layers[0].weight[1], w0[3]) and torch.equal(swapped.layers[0].weight[3], w0[1])
    assert torch.equal(swapped.layers[1].weight[:, 1], w1[:, 3])
    assert torch.equal(swapped.layers[0].bias[[1, 3]], model.layers[0].bias[[3, 1]])


def test_swap_on_a_skip_connected_layer_preserves_function(residual):
    model, x, spec = residual
    swapped = fusion.swap_neurons(model, "a2", 0, 5, spec=spec)  # a2 writes into the residual stream
    assert not state_equal(model, swapped)
    assert fusion.verify_equivalence(model, swapped, x) <= EQUIV_TOL


def test_permute_layer_applies_an_explicit_order(residual):
    model, x, spec = residual
    order = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    out = fusion.permute_layer(model, "stem.0", order, spec=spec)
    assert torch.equal(out.stem[0].weight, model.stem[0].weight[order])
    assert torch.equal(out.stem[1].running_mean, model.stem[1].running_mean[order])
    assert fusion.verify_equivalence(model, out, x) <= EQUIV_TOL


def test_inplace_modifies_the_model_itself(residual):
    model, x, spec = residual
    copy = fusion.permute(model, {}, spec)
    out = fusion.permute(copy, fusion.random_permutation(spec, seed=2), spec, inplace=True)
    assert out is copy and not state_equal(model, copy)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]), "repeats"),
        (torch.arange(7), r"shape \(8,\)"),
        (torch.arange(8).float(), "integer dtype"),
        (torch.tensor([0, 1, 2, 3, 4, 5, 6, 8]), "outside"),
        ("abc", "must be a tensor"),
    ],
)
def test_malformed_permutation_is_refused_and_nothing_is_written(residual, bad, message):
    model, _, spec = residual
    target = fusion.permute(model, {}, spec)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    perms = fusion.random_permutation(spec)
    perms["stem.0"] = bad
    with pytest.raises(PermutationError, match=message):
        fusion.permute(target, perms, spec, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_unknown_group_name_is_refused(residual):
    model, _, spec = residual
    with pytest.raises(PermutationError, match="no permutation group named 'bogus'"):
        fusion.permute(model, {"bogus": torch.arange(3)}, spec)


def test_swap_index_out_of_range_is_refused(residual):
    model, _, spec = residual
    with pytest.raises(PermutationError, match="j=99"):
        fusion.swap_neurons(model, "a1", 0, 99, spec=spec)


def test_swap_without_inputs_or_spec_is_refused():
    with pytest.raises(PermutationError, match="example_inputs"):
        fusion.swap_neurons(MLP(), "layers.0", 0, 1)


def test_verify_equivalence_detects_a_different_function_and_keeps_modes():
    a, b = MLP(), MLP()
    a.train()
    x = torch.randn(4, 8)
    assert fusion.verify_equivalence(a, a, x) == 0.0
    assert fusion.verify_equivalence(a, b, x) > 0.01
    assert a.training


def test_verify_equivalence_refuses_mixed_dtypes():
    with pytest.raises(DeviceMismatchError, match="dtype"):
        fusion.verify_equivalence(MLP(), MLP().double(), torch.randn(2, 8))


def test_neuronswap_example_on_resnet18_skip_connections():
    x = torch.randn(1, 3, 32, 32)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10), x)
    spec = fusion.permutation_spec(model, x)
    out = model
    for layer in ["layer1.0.conv1", "layer1.0.conv2", "layer2.1.conv2", "layer4.1.conv1"]:
        out = fusion.swap_neurons(out, layer, 2, 3, spec=spec)
    assert fusion.verify_equivalence(model, out, x) <= EQUIV_TOL
    assert not torch.equal(out.conv1.weight, model.conv1.weight)  # layer1.0.conv2 moves the whole stream


@pytest.mark.parametrize("make", [torch.tensor, lambda v: torch.tensor(v, dtype=torch.int32), np.int64, np.array])
def test_swap_accepts_integer_like_scalars(residual, make):
    model, x, spec = residual
    expected = fusion.swap_neurons(model, "a1", 4, 6, spec=spec)
    swapped = fusion.swap_neurons(model, "a1", make(4), make(6), spec=spec)
    assert state_equal(expected, swapped)


@pytest.mark.parametrize("bad, message", [(torch.tensor(1.0), "integer"), (True, "boolean"),
                                          (torch.tensor([1, 2]), "shape"), (1.5, "integer")])
def test_swap_refuses_non_integer_indices_naming_the_value(residual, bad, message):
    model, _, spec = residual
    with pytest.raises(PermutationError, match=message):
        fusion.swap_neurons(model, "a1", bad, 0, spec=spec)


def test_a_norm_layer_resolves_to_the_units_it_normalises(residual):
    model, x, spec = residual
    via_norm = fusion.swap_neurons(model, "bn", 1, 3, spec=spec)  # bn normalises b2's output (with short)
    via_conv = fusion.swap_neurons(model, "b2", 1, 3, spec=spec)
    assert state_equal(via_norm, via_conv)
    assert fusion.verify_equivalence(model, via_norm, x) <= EQUIV_TOL


def test_resnet_bn1_swaps_the_stem_stream():
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    spec = fusion.permutation_spec(model, x)
    swapped = fusion.swap_neurons(model, "bn1", torch.tensor(4), torch.tensor(9), spec=spec)
    assert torch.equal(swapped.conv1.weight[4], model.conv1.weight[9])
    assert fusion.verify_equivalence(model, swapped, x) <= EQUIV_TOL


def test_the_output_layer_is_still_refused(residual):
    model, _, spec = residual
    with pytest.raises(PermutationError, match="output"):
        fusion.swap_neurons(model, "head", 0, 1, spec=spec)


def test_verify_equivalence_over_batches_takes_the_maxima_over_all_of_them(residual):
    model, x, spec = residual
    other = fusion.permute(model, fusion.random_permutation(spec, seed=3), spec)
    with torch.no_grad():
        other.head.bias.add_(torch.arange(5.0))  # a real difference, larger on some outputs
    batches = [(x[:1], None), (x[1:], None)]
    assert fusion.verify_equivalence(model, other, data=batches) == pytest.approx(
        fusion.verify_equivalence(model, other, x))
    with pytest.raises(PermutationError, match="exactly one"):
        fusion.verify_equivalence(model, other, x, data=batches)
