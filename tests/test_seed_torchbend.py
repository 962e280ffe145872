"""Seed 001 (torchbend's BendedModule walk-through) runs with only ``import torchbend as tb`` changed.

Each test is one cell of the document, its code kept as written (``print`` calls included), followed by
assertions of the behaviour the document describes.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn

import fusion as tb  # the document: import torchbend as tb


class Stanley(nn.Module):
    def __init__(self, n_channels=4):
        super().__init__()
        self.conv_modules = nn.Sequential(
            nn.Conv1d(1, n_channels, 3),
            nn.Conv1d(n_channels, 8, 3)
        )
        self.batch_norm = nn.BatchNorm1d(8)
        self.nnlin = nn.Sigmoid()
        self.n_channels = n_channels

    def forward(self, x):
        out = self.conv_modules(x)
        out = self.batch_norm(out)
        out = self.nnlin(out)
        return out

    def forward_nobatch(self, x):
        out = self.conv_modules(x)
        out = self.nnlin(out)
        return out


@pytest.fixture
def bended() -> tb.BendedModule:
    torch.manual_seed(0)
    return tb.BendedModule(Stanley())


def test_cell2_weights_names_shapes_and_table(bended: tb.BendedModule, tmp_path: pytest.TempPathFactory, capsys) -> None:
    weight_names = bended.weight_names
    weight_shapes = list(map(bended.weight_shape, weight_names))
    bended.print_weights()
    assert weight_names[:6] == ["conv_modules.0.weight", "conv_modules.0.bias", "conv_modules.1.weight",
                                "conv_modules.1.bias", "batch_norm.weight", "batch_norm.bias"]
    assert weight_shapes[0] == torch.Size([4, 1, 3]) and weight_shapes[2] == torch.Size([8, 4, 3])
    assert "conv_modules.1.weight" in capsys.readouterr().out
    bended.print_weights(out=tmp_path / "weights.txt")
    assert "batch_norm.bias" in (tmp_path / "weights.txt").read_text()


def test_cell3_trace_forward_and_another_method(bended: tb.BendedModule, capsys) -> None:
    x = torch.zeros(4, 1, 128)
    bended.trace(x=x)
    activation_names = bended.activation_names()
    activation_shapes = list(map(bended.activation_shape, activation_names))
    print('forward method : ')
    bended.print_activations()
    assert activation_names == ["x", "conv_modules_0", "conv_modules_1", "batch_norm", "nnlin"]
    assert activation_shapes == [torch.Size([4, 1, 128]), torch.Size([4, 4, 126]), torch.Size([4, 8, 124]),
                                 torch.Size([4, 8, 124]), torch.Size([4, 8, 124])]

    fn = "forward_nobatch"
    bended.trace(fn, x=x)
    activation_names = bended.activation_names(fn)
    activation_shapes = list(map(partial(bended.activation_shape, fn=fn), activation_names))
    print(f'{fn} method : ')
    bended.print_activations(fn)
    assert activation_names == ["x", "conv_modules_0", "conv_modules_1", "nnlin"]
    assert activation_shapes[-1] == torch.Size([4, 8, 124])
    assert "forward_nobatch method" in capsys.readouterr().out


def test_cell4_graph_and_graph_module_per_method(bended: tb.BendedModule) -> None:
    fn = "forward"
    graph = bended.graph(fn)
    print('Graph : ')
    graph.print_tabular()
    fn = "forward_nobatch"
    graph_module = bended.graph_module(fn)
    print('\nGraph : ')
    graph_module.graph.print_tabular()
    assert [n.name for n in graph.nodes] == ["x", "conv_modules_0", "conv_modules_1", "batch_norm", "nnlin", "output"]
    assert [n.name for n in graph_module.graph.nodes] == ["x", "conv_modules_0", "conv_modules_1", "nnlin", "output"]
    x = torch.randn(2, 1, 32)
    assert torch.equal(graph_module(x), bended.module.forward_nobatch(x))


def test_cell5_get_activations_by_name(bended: tb.BendedModule) -> None:
    x = torch.zeros(4, 1, 128)
    outs = bended.get_activations("conv_modules_0", "nnlin", x=x, fn="forward")
    print({k: v.shape for k, v in outs.items()})
    assert {k: v.shape for k, v in outs.items()} == {"conv_modules_0": torch.Size([4, 4, 126]),
                                                     "nnlin": torch.Size([4, 8, 124])}


def test_cell6_bend_weights_and_activations_then_reset(bended: tb.BendedModule) -> None:
    module = bended.module
    x = torch.randn(4, 1, 128)
    bended.trace(x=x)
    out = bended.forward(x)

    cb = tb.Mask(prob=0.4)
    bended.bend(cb, "conv_modules.0.weight", "nnlin")

    out_bended = bended.forward(x)
    print("original == bended :", (out == out_bended).all())
    print("original param == bended param :", (module.conv_modules[0].weight == bended.module.conv_modules[0].weight).all())
    assert not (out == out_bended).all()
    assert (module.conv_modules[0].weight == bended.module.conv_modules[0].weight).all()

    # revert bending
    bended.reset()
    out_reverted = bended.forward(x)
    print("original == reverted :", (out == out_reverted).all())
    assert (out == out_reverted).all()


def test_cell7_original_and_bended_state_dicts_graphs_activations(bended: tb.BendedModule) -> None:
    bended.trace(x=torch.zeros(4, 1, 128))
    cb = tb.Mask(prob=0.4)
    bended.bend(cb, "conv_modules.0.weight", "nnlin")

    original_state_dict = bended.state_dict()
    bended_state_dict = bended.bended_state_dict()
    print("-- original state dict :\n", original_state_dict['conv_modules.0.weight'])
    print("-- bended state dict: \n", bended_state_dict['conv_modules.0.weight'])
    assert list(original_state_dict) == list(bended.module.state_dict())
    assert torch.equal(original_state_dict["conv_modules.0.weight"], bended.module.conv_modules[0].weight)
    masked = bended_state_dict["conv_modules.0.weight"] == 0
    assert masked.any() and torch.equal(bended_state_dict["conv_modules.0.weight"][~masked],
                                        original_state_dict["conv_modules.0.weight"][~masked])

    original_graph = bended.graph()
    bended_graph = bended.bend_graph()
    print("-- original graph :\n", original_graph)
    print("-- bended graph: \n", bended_graph)
    assert len(list(bended_graph.nodes)) == len(list(original_graph.nodes)) + 1

    x = torch.randn(4, 1, 128)
    original_activation = bended.get_activations("nnlin", x=x, bended=False)
    bended_activation = bended.get_activations("nnlin", x=x)
    print(original_activation['nnlin'].shape)
    print(bended_activation['nnlin'].shape)
    assert original_activation["nnlin"].shape == bended_activation["nnlin"].shape == torch.Size([4, 8, 124])
    assert (bended_activation["nnlin"] == 0).any() and not (original_activation["nnlin"] == 0).any()


def test_cell8_9_channel_mask_works_for_other_input_lengths(bended: tb.BendedModule) -> None:
    bended.trace(x=torch.zeros(4, 1, 128))
    bended.bend(tb.Mask(prob=0.4), "conv_modules.0.weight", "nnlin")
    x = torch.randn(1, 1, 64)
    try:
        out = bended.forward(x)
    except RuntimeError as e:
        print(e)

    bended.reset()
    bended.bend(tb.Mask(prob=0.3, dim=-2), "nnlin")

    x = torch.randn(1, 1, 64)
    out = bended.forward(x)
    assert out.shape == (1, 8, 60)
    zero_channels = (out == 0).all(-1)[0]
    assert torch.equal(out[0, ~zero_channels], bended.module(x)[0, ~zero_channels])


def test_cell10_bending_config_save_and_load(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = Stanley()
    bended = tb.BendedModule(module)
    bended.trace(x=torch.randn(1, 1, 1024))

    bended.bend(tb.Mask(prob=0.4), "conv_modules.0.weight", "nnlin")
    bended.bend(tb.Mask(prob=0.6), "conv_modules.0.weight", "conv_modules.1.weight")

    bending_config = bended.bending_config()
    print("bending config : ", bending_config)
    key = "conv_modules.0.weight"
    print(f"operations for key {key}:", bending_config.op_from_key(key))
    assert [cb.prob for cb in bending_config.op_from_key(key)] == [0.4, 0.6]

    bending_config.save('test.tb')
    bending_config = tb.BendingConfig.load('test.tb', module=bended)
    print("loaded config : ", bending_config)
    assert bending_config == bended.bending_config()


def test_cell11_configs_add_compare_and_bind(bended: tb.BendedModule) -> None:
    bended.trace(x=torch.randn(1, 1, 1024))
    cb1 = tb.Mask(0.8)
    config1 = tb.BendingConfig(
        (cb1, r"conv_modules.\d.weight"),
        (cb1, "nnlin")
    )
    config2 = tb.BendingConfig((cb1, r"conv_modules.\d.weight")) + tb.BendingConfig((cb1, "nnlin"))

    print('Before binding : ')
    print("config1 :", config1)
    print("config2 :", config2)
    print(config1 == config2)
    assert config1 == config2

    config1.bind(bended)
    config2.bind(bended)

    print('\nAfter binding : ')
    print("config1 :", config1)
    print("config2 :", config2)
    assert config1.entries[0][1] == ("conv_modules.0.weight", "conv_modules.1.weight")

    bended.reset()
    bended.bend(config1)
    module_config = bended.bending_config()
    print('\nComparison : ')
    print(config1 == module_config)
    assert config1 == module_config


def test_cell12_versions_and_interpolation() -> None:
    module = Stanley()
    bended = tb.BendedModule(module)

    x = torch.randn(1, 1, 128)
    out_unbended = bended(x)

    print("default version : ", bended.version)
    default = bended.version
    bended.bend(tb.Mask(prob=0.3), "conv_modules.0.weight")
    bended.write("bended")
    print("current version : ", bended.version)
    assert bended.version == "bended"

    # revert to default
    bended.version = None
    print('current version : ', bended.version)
    assert bended.version == default

    with bended.set_version():
        out_original = bended(x)
    with bended.set_version("bended"):
        out_bended = bended(x)

    with bended.interpolate(1., bended=1.):
        out_interpolated = bended(x)

    print("original == bended : ", (out_original == out_bended).all())
    print("original == interpolated : ", (out_original == out_interpolated).all())
    print("bended == interpolated : ", (out_bended == out_interpolated).all())
    assert torch.equal(out_original, out_unbended)
    assert not (out_original == out_bended).all()
    assert not (out_original == out_interpolated).all()
    assert not (out_bended == out_interpolated).all()


def test_cell13_import_a_version_from_another_module() -> None:
    module = Stanley()
    module2 = Stanley()
    bended = tb.BendedModule(module)
    bended.create_version("imported", module2)

    x = torch.randn(1, 1, 128)
    with bended.set_version():
        out_original = bended(x)
    with bended.set_version("imported"):
        out_imported = bended(x)
    with bended.interpolate(1., imported=1.):
        out_interpolated = bended(x)

    print("original == imported : ", (out_original == out_imported).all())
    print("original == interpolated : ", (out_original == out_interpolated).all())
    print("imported == interpolated : ", (out_imported == out_interpolated).all())
    assert torch.allclose(out_imported, module2(x))
    assert not (out_original == out_imported).all()
    assert not (out_original == out_interpolated).all() and not (out_imported == out_interpolated).all()

    class Doppleganger(nn.Module):
        pass

    raised = False
    try:
        bended.create_version("imported", Doppleganger())
    except tb.BendingError as e:
        print(e)
        raised = True
    assert raised
