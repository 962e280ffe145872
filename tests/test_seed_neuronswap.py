"""Seed 000 (neuronswap): the document's two examples run with only their import lines changed,
plus the behaviours the document names (units to the front, several layers, output layer skipped)."""

from __future__ import annotations

import pytest
import torch
from torchvision import models

import fusion.neuronswap as modx
import fusion.neuronswap as ns
from fusion.errors import PermutationError


class FCnet(torch.nn.Module):
    def __init__(self):
        super(FCnet, self).__init__()  # noqa: UP008 (the seed's code, verbatim)
        self.fc1 = torch.nn.Linear(5, 10)
        self.fc2 = torch.nn.Linear(10, 12)
        self.fc3 = torch.nn.Linear(12, 4)

    def forward(self, x):
        x = torch.nn.functional.relu(self.fc1(x))
        x = torch.nn.functional.relu(self.fc2(x))
        x = self.fc3(x)
        return x


def test_the_fcnet_example_runs_unchanged_and_keeps_the_output() -> None:
    torch.manual_seed(0)
    model = FCnet()
    eq_indexes = {"fc1": torch.tensor([4, 9], device='cpu'),
                  "fc2": torch.tensor([3, 6], device='cpu'),
                  "fc3": torch.tensor([1, 2], device='cpu')}

    graph = torch.fx.symbolic_trace(model).graph
    layers_list = modx.get_layers_list(graph, model)

    input = torch.rand(5)

    output_before = model(input)

    with pytest.warns(UserWarning, match="'fc3' skipped: its units are the model's output"):
        ns.swap(layers_list, eq_indexes)

    output_after = model(input)

    assert torch.allclose(output_before, output_after, rtol=1e-5, atol=1e-8)


def test_the_resnet18_example_runs_unchanged_and_keeps_the_output() -> None:
    torch.manual_seed(0)
    model = models.resnet18()

    eq_indexes = {'layer1.0.conv1': [2,3],
                  'layer1.1.conv1': [2,3],
                  'layer2.0.conv1': [2,3],
                  'layer2.1.conv1': [2,3],
                  'layer3.0.conv1': [2,3],
                  'layer3.1.conv1': [2,3],
                  'layer4.0.conv1': [2,3],
                  'layer4.1.conv1': [2,3], }

    graph = torch.fx.symbolic_trace(model).graph
    layers_list = modx.get_layers_list(graph, model)
    skip_connections = modx.get_skipped_layers(graph, layers_list)

    input = torch.rand([1,3,244,244])

    model.train(False)

    output_before = model(input)

    ns.swap(layers_list, eq_indexes, skip_connections)

    output_after = model(input)

    assert torch.allclose(output_before, output_after, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.layer1[0].conv1.weight[2], models.resnet18().layer1[0].conv1.weight[2])


def _fcnet_copy() -> tuple[FCnet, FCnet]:
    torch.manual_seed(1)
    model = FCnet()
    original = FCnet()
    original.load_state_dict(model.state_dict())
    return model, original


def test_layers_are_listed_in_execution_order() -> None:
    class Reversed(torch.nn.Module):  # registered b, a; run a, b
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Linear(6, 3)
            self.a = torch.nn.Linear(4, 6)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    layers = modx.get_layers_list(Reversed())
    assert layers.names == ("a", "b")
    assert list(layers) == [layers.model.a, layers.model.b]


def test_listed_units_move_to_the_front_in_the_order_given() -> None:
    model, original = _fcnet_copy()
    ns.swap(model, {"fc1": [4, 9], "fc2": torch.tensor([6, 3])})
    assert torch.equal(model.fc1.weight, original.fc1.weight[[4, 9, 0, 1, 2, 3, 5, 6, 7, 8]])
    assert torch.equal(model.fc2.weight[:2], original.fc2.weight[[6, 3]][:, [4, 9, 0, 1, 2, 3, 5, 6, 7, 8]])
    assert torch.equal(model.fc3.weight[:, :2], original.fc3.weight[:, [6, 3]])


def test_inplace_false_returns_a_swapped_copy_and_keeps_the_model() -> None:
    model, original = _fcnet_copy()
    swapped = ns.swap(model, {"fc1": [1, 0]}, inplace=False)
    assert torch.equal(model.fc1.weight, original.fc1.weight)
    assert torch.equal(swapped.fc1.weight[0], original.fc1.weight[1])


def test_bad_indices_are_refused_before_anything_moves() -> None:
    model, original = _fcnet_copy()
    with pytest.raises(PermutationError, match="repeat"):
        ns.swap(model, {"fc1": [0, 1], "fc2": [2, 2]})
    with pytest.raises(PermutationError, match="out of range"):
        ns.swap(model, {"fc1": [10]})
    assert torch.equal(model.fc1.weight, original.fc1.weight)


def test_skip_connection_layers_are_reported_and_still_swapped_function_preservingly() -> None:
    torch.manual_seed(0)
    from fusion.models import SmallResNet

    model = SmallResNet(in_channels=3, width=4, num_classes=5).eval()
    x = torch.randn(2, 3, 8, 8)
    layers = modx.get_layers_list(model, example_inputs=x)
    skipped = modx.get_skipped_layers(layers)
    assert skipped and all(name in layers.names for name in skipped)
    before = model(x)
    ns.swap(layers, {skipped[0]: [1, 0]}, skipped)
    assert torch.allclose(model(x), before, rtol=1e-5, atol=1e-6)
