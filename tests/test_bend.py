"""Specification of fusion.inspect.bend: inspecting, bending, configs and weight versions."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from fusion.errors import BendingError, FusionError
from fusion.inspect.bend import BendedModule, BendingConfig, Inspector
from fusion.inspect.callbacks import Lambda, Mask, Noise, Permute, Scale


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)
    ).eval()


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > -1e9:
            h = torch.relu(h)
        return self.b(h)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


X = torch.randn(2, 3, 8, 8)


# ----------------------------------------------------------------------------------- inspecting
def test_weight_names_are_the_floating_state_dict_entries() -> None:
    model = _cnn()
    names = Inspector(model).weight_names
    assert names == [k for k, v in model.state_dict().items() if v.is_floating_point()]
    assert "1.num_batches_tracked" not in names


def test_print_weights_prints_and_returns_a_table_with_statistics(capsys: pytest.CaptureFixture[str]) -> None:
    model = _cnn()
    table = Inspector(model).print_weights()
    assert capsys.readouterr().out.strip() == table.strip()
    row = next(line for line in table.splitlines() if line.startswith("3.weight"))
    w = model[3].weight.double()
    assert "(8, 4, 3, 3)" in row and "float32" in row
    assert f"{w.min().item():.4g}" in row and f"{w.std().item():.4g}" in row


def test_trace_records_fx_node_shapes_for_print_activations(capsys: pytest.CaptureFixture[str]) -> None:
    inspector = Inspector(_cnn()).trace(X)
    assert inspector.activation_shapes()["_3"] == ((2, 8, 4, 4), torch.float32)
    table = inspector.print_activations()
    assert "(2, 8, 4, 4)" in capsys.readouterr().out
    assert [line.split()[0] for line in table.splitlines()[2:]] == inspector.activation_names()


def test_activation_shapes_need_trace_first() -> None:
    with pytest.raises(BendingError, match="trace"):
        Inspector(_cnn()).print_activations()


def test_graph_module_computes_the_model() -> None:
    model = _cnn()
    inspector = Inspector(model)
    assert torch.equal(inspector.graph_module()(X), model(X))
    assert any(node.op == "call_module" for node in inspector.graph().nodes)


def test_get_activations_on_resnet18_equals_forward_hooks() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    modules = ["conv1", "bn1", "layer1.0.conv1", "layer1", "layer2.0.downsample.0", "layer3.1", "avgpool", "fc"]
    hooked: dict[str, torch.Tensor] = {}
    handles = [
        dict(model.named_modules())[n].register_forward_hook(lambda _m, _i, out, n=n: hooked.__setitem__(n, out.clone()))
        for n in modules
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    acts = Inspector(model).get_activations(x, modules)
    assert list(acts) == modules
    for name in modules:
        assert torch.equal(acts[name], hooked[name]), name


def test_get_activations_accepts_regular_expressions_over_node_names() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    acts = Inspector(model).get_activations(torch.randn(1, 3, 32, 32), r"layer\d_1_relu_1")
    assert list(acts) == [f"layer{k}_1_relu_1" for k in range(1, 5)]


def test_get_activations_falls_back_to_hooks_when_fx_cannot_trace() -> None:
    model = _Branchy()
    inspector = Inspector(model)
    x = torch.randn(3, 4)
    assert not inspector.uses_fx
    assert inspector.activation_names() == ["a", "b"]
    assert torch.equal(inspector.get_activations(x, "a")["a"], model.a(x))
    with pytest.raises(BendingError, match="torch.fx cannot trace"):
        inspector.graph()


# ------------------------------------------------------------------------------------- bending
@pytest.mark.parametrize("inplace", [False, True])
def test_bend_then_reset_restores_the_state_dict_bitwise(inplace: bool) -> None:
    model = _cnn()
    original = _state(model)
    inspector = Inspector(model, inplace=inplace)
    inspector.bend(Mask(0.5, seed=1), r"\d\.weight").bend(Noise(0.1, seed=2), "0.bias").bend(Scale(3.0), "6.weight")
    inspector.bend(Permute(torch.randperm(8).tolist(), dim=0), "3.bias")
    bent = inspector.bended_state_dict()
    assert not torch.equal(bent["0.weight"], original["0.weight"])
    if inplace:
        assert torch.equal(model[0].weight, bent["0.weight"])
    else:
        _assert_bitwise(_state(model), original)
    inspector.reset()
    _assert_bitwise(inspector.bended_state_dict(), original)
    _assert_bitwise(_state(model), original)
    assert torch.equal(inspector(X), model(X))


def test_weight_bend_changes_output_without_touching_the_model() -> None:
    model = _cnn()
    original, y = _state(model), model(X)
    inspector = Inspector(model).bend(Mask(0.5, seed=0), "3.weight")
    assert not torch.allclose(inspector(X), y)
    _assert_bitwise(_state(model), original)
    assert torch.equal(model(X), y)


def test_mask_zeroes_entries_with_the_given_probability() -> None:
    w = torch.ones(200, 100)
    masked = Mask(0.3, seed=0)(w, "w")
    assert abs((masked == 0).float().mean().item() - 0.3) < 0.02
    assert torch.equal(Mask(0.3, seed=0)(w, "w"), masked)


def test_mask_with_dim_zeroes_whole_channels() -> None:
    model = _cnn()
    bent = Inspector(model).bend(Mask(0.5, dim=0, seed=3), "3.weight").bended_state_dict()["3.weight"]
    zero = bent.flatten(1).abs().sum(1) == 0
    assert 0 < int(zero.sum()) < 8
    assert torch.equal(bent[~zero], model[3].weight[~zero])


def test_matching_permutations_of_two_layers_keep_the_function() -> None:
    model = _mlp()
    x = torch.randn(5, 6)
    order = torch.randperm(12).tolist()
    inspector = Inspector(model).bend(Permute(order, dim=0), "0.weight", "0.bias").bend(Permute(order, dim=1), "2.weight")
    assert not torch.equal(inspector.bended_state_dict()["0.weight"], model[0].weight)
    torch.testing.assert_close(inspector(x), model(x), rtol=1e-5, atol=1e-6)


def test_activation_bend_is_applied_in_the_graph() -> None:
    model = _cnn()
    inspector = Inspector(model).trace(X).bend(Mask(0.5, dim=1, seed=4), "3")
    bent = inspector.get_activations(X, "3")["3"]
    plain = inspector.get_activations(X, "3", bended=False)["3"]
    zero_channels = bent.abs().sum((0, 2, 3)) == 0
    assert 0 < int(zero_channels.sum()) < 8
    assert torch.equal(bent[:, ~zero_channels], plain[:, ~zero_channels])
    downstream = model[6](model[5](model[4](bent)))
    torch.testing.assert_close(inspector(X), downstream)
    assert torch.equal(model(X), inspector.get_activations(X, "6", bended=False)["6"])


def test_activation_bend_works_through_hooks_for_untraceable_models() -> None:
    model = _Branchy()
    x = torch.randn(3, 4)
    inspector = Inspector(model).bend(Scale(0.0), "a")
    torch.testing.assert_close(inspector(x), model.b(torch.zeros(3, 8)))
    assert torch.equal(inspector.get_activations(x, "a")["a"], torch.zeros(3, 8))
    assert not model._forward_hooks and not model.a._forward_hooks


def test_user_callable_bends_weights() -> None:
    model = _mlp()
    inspector = Inspector(model).bend(lambda w: w.clamp(min=0), "0.weight")
    assert torch.equal(inspector.bended_state_dict()["0.weight"], model[0].weight.detach().clamp(min=0))


def test_bended_module_is_an_alias() -> None:
    assert BendedModule is Inspector


# -------------------------------------------------------------------------------------- config
def test_config_binds_regexes_to_concrete_names() -> None:
    inspector = Inspector(_cnn())
    config = BendingConfig((Mask(0.2, seed=0), r"[03]\.weight"), (Scale(2.0), "4"))
    bound = config.bind(inspector)
    assert bound.entries == ((Mask(0.2, seed=0), ("0.weight", "3.weight")), (Scale(2.0), ("_4",)))
    assert bound.callbacks_for("3.weight") == [Mask(0.2, seed=0)]


def test_config_sum_and_equality() -> None:
    a, b = (Mask(0.8, seed=1), r"\d\.weight"), (Scale(2.0), "4")
    assert BendingConfig(a) + BendingConfig(b) == BendingConfig(a, b)
    assert BendingConfig(a) != BendingConfig(b)


def test_applying_a_config_equals_applying_its_bends() -> None:
    model = _cnn()
    config = BendingConfig((Mask(0.4, seed=5), "0.weight", "4"), (Noise(0.05, seed=6), "6.bias"))
    by_config = Inspector(model).bend(config)
    by_hand = Inspector(model).bend(Mask(0.4, seed=5), "0.weight", "4").bend(Noise(0.05, seed=6), "6.bias")
    assert torch.equal(by_config(X), by_hand(X))
    assert by_config.bending_config() == config.bind(model)


def test_config_round_trips_through_a_json_file(tmp_path: pytest.TempPathFactory) -> None:
    model = _cnn()
    inspector = Inspector(model).bend(Mask(0.3, dim=1, seed=9), "3").bend(Permute([2, 0, 1, 3], dim=0), "0.bias")
    path = inspector.bending_config().save(tmp_path / "bends.json")
    assert json.loads(path.read_text())["bends"][1]["callback"] == {"type": "Permute", "order": [2, 0, 1, 3], "dim": 0}
    loaded = BendingConfig.load(path, module=model)
    assert loaded == inspector.bending_config()
    assert torch.equal(Inspector(model).bend(loaded)(X), inspector(X))


def test_user_callables_cannot_be_serialised() -> None:
    config = BendingConfig((Lambda(torch.neg), "0.weight"))
    with pytest.raises(BendingError, match="cannot be serialised"):
        config.to_json()


# ------------------------------------------------------------------------------------ versions
def test_versions_snapshot_set_and_write() -> None:
    model = _cnn()
    y = model(X)
    inspector = Inspector(model).bend(Mask(0.5, seed=0), "3.weight")
    y_bent = inspector(X)
    inspector.write("bent").reset()
    assert inspector.versions == ["original", "bent"]
    assert torch.equal(inspector(X), y)
    with inspector.set_version("bent"):
        assert inspector.version == "bent"
        assert torch.equal(inspector(X), y_bent)
    assert inspector.version == "original"
    assert torch.equal(inspector(X), y)


def test_create_version_from_another_model_and_interpolate() -> None:
    model_a, model_b = _mlp(), _mlp()
    x = torch.randn(4, 6)
    inspector = Inspector(model_a).create_version("b", model_b)
    average = _mlp()
    average.load_state_dict({k: 0.3 * v + 0.7 * model_b.state_dict()[k] for k, v in model_a.state_dict().items()})
    with inspector.interpolate({"original": 0.3, "b": 0.7}):
        assert inspector.version is None
        torch.testing.assert_close(inspector(x), average(x))
    assert torch.equal(inspector(x), model_a(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_interpolate_restores_weights_after_an_exception(inplace: bool) -> None:
    model_a, model_b = _mlp(), _mlp()
    original = _state(model_a)
    inspector = Inspector(model_a, inplace=inplace).create_version("b", model_b)
    with pytest.raises(KeyError), inspector.interpolate({"original": 0.5, "b": 0.5}):
        raise KeyError("boom")
    _assert_bitwise(inspector.bended_state_dict(), original)
    _assert_bitwise(_state(model_a), original)
    assert inspector.version == "original"


def test_write_snapshots_the_bent_weights_switches_to_them_and_applies_the_bend_once() -> None:
    model = _mlp()
    x = torch.randn(4, 6)
    inspector = Inspector(model).bend(Noise(0.5, seed=3), "0.weight")
    y_noisy = inspector(x)
    inspector.write("noisy")
    assert inspector.version == "noisy"
    assert inspector.bending_config() == BendingConfig()
    assert torch.equal(inspector(x), y_noisy)
    inspector.set_version("noisy")
    assert torch.equal(inspector(x), y_noisy)
    inspector.version = None
    assert inspector.version == "original"
    assert torch.equal(inspector(x), model(x))


def test_switching_versions_clears_live_weight_bends_unless_asked_to_keep_them() -> None:
    model, other = _mlp(), _mlp()
    x = torch.randn(4, 6)
    inspector = Inspector(model).create_version("other", other).bend(Scale(0.0), "2.weight")
    with inspector.set_version("other"):
        torch.testing.assert_close(inspector(x), other(x))
    with inspector.set_version("other", keep_bends=True):
        torch.testing.assert_close(inspector(x), other[2].bias.expand(4, 3))
    with inspector.interpolate(other=1.0):
        torch.testing.assert_close(inspector(x), other(x))
    assert inspector.version == "original"
    torch.testing.assert_close(inspector(x), model[2].bias.expand(4, 3))


def test_activation_bends_stay_live_across_versions() -> None:
    model = _cnn()
    inspector = Inspector(model).trace(X).bend(Scale(0.0), "4").bend(Mask(0.5, seed=1), "0.weight").write("v")
    torch.testing.assert_close(inspector(X), model[6].bias.expand(2, 5))
    assert [names for _, names in inspector.bending_config()] == [("_4",)]


def _bn_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).train()


@pytest.mark.parametrize("inplace", [False, True])
def test_train_mode_model_runs_with_batch_statistics_but_its_buffers_never_change(inplace: bool) -> None:
    model = _bn_model()
    reference = _bn_model()
    reference.load_state_dict(model.state_dict())
    inspector = Inspector(model, inplace=inplace).bend(Scale(1.0), "0.weight")
    before = _state(model)
    x = torch.randn(8, 3, 8, 8)
    torch.testing.assert_close(inspector(x), reference(x))
    inspector.trace(x).bend(Scale(2.0), "2")
    inspector(x)
    inspector.get_activations("1", "4", input=x)
    inspector.get_activations("1", inputs=x, bended=False)
    assert model.training
    _assert_bitwise(_state(model), before)


def test_untraceable_train_mode_model_keeps_its_buffers() -> None:
    class Branchy(_Branchy):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + self.norm(self.a(x)).sum()

    model = Branchy().train()
    before = _state(model)
    inspector = Inspector(model).bend(Scale(0.5), "a")
    inspector(torch.randn(5, 4))
    inspector.get_activations("norm", inputs=torch.randn(5, 4))
    _assert_bitwise(_state(model), before)


class _TwoMethods(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))

    def skip_relu(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_other_methods_are_traced_and_run_bent() -> None:
    model = _TwoMethods()
    x = torch.randn(3, 4)
    inspector = Inspector(model).trace("skip_relu", x=x)
    assert inspector.activation_names("skip_relu") == ["x", "a", "b"]
    assert inspector.activation_shape("b", fn="skip_relu") == torch.Size([3, 2])
    inspector.bend(Scale(0.0), "a.weight")
    torch.testing.assert_close(inspector.skip_relu(x), model.b(model.a.bias.expand(3, 4)))
    inspector.bend(Scale(0.0), "a")
    torch.testing.assert_close(inspector.run("skip_relu", x), model.b.bias.expand(3, 2))
    assert torch.equal(inspector.get_activations("a", x=x, fn="skip_relu")["a"], torch.zeros(3, 4))


def test_state_dict_has_the_wrapped_models_keys_and_original_weights() -> None:
    model = _cnn()
    inspector = Inspector(model, inplace=True).bend(Scale(2.0), "0.weight")
    state = inspector.state_dict()
    assert list(state) == list(model.state_dict())
    assert torch.equal(state["0.weight"] * 2, model[0].weight)


# ---------------------------------------------------------------------------------- bad input
def test_unknown_name_is_rejected_with_the_known_names() -> None:
    with pytest.raises(BendingError, match=r"no weight or activation named or matching 'conv9'.*0\.weight"):
        Inspector(_cnn()).bend(Scale(2.0), "conv9")


@pytest.mark.parametrize("prob", [-0.1, 1.5, "half"])
def test_bad_probability_is_rejected(prob: object) -> None:
    with pytest.raises(BendingError, match="prob must be a probability"):
        Mask(prob)


def test_permutation_of_the_wrong_length_is_a_shape_mismatch() -> None:
    inspector = Inspector(_cnn())
    with pytest.raises(BendingError, match=r"order has 3 entries but 3.weight has size 8 along dim 0"):
        inspector.bend(Permute([2, 1, 0]), "3.weight")
    assert inspector.bending_config() == BendingConfig()


def test_callable_changing_the_shape_is_rejected() -> None:
    with pytest.raises(BendingError, match=r"changes weight '0.weight' from shape \(4, 3, 3, 3\)"):
        Inspector(_cnn()).bend(lambda w: w[:2], "0.weight")


def test_activation_bend_is_checked_against_traced_shapes() -> None:
    inspector = Inspector(_cnn()).trace(X)
    with pytest.raises(BendingError, match="activation '_3'"):
        inspector.bend(Permute([1, 0], dim=1), "3")


def test_malformed_permutation_is_rejected() -> None:
    with pytest.raises(BendingError, match="permutation of 0..2"):
        Permute([0, 0, 1])


def test_unknown_version_is_rejected() -> None:
    with pytest.raises(BendingError, match="unknown version 'nope'"):
        Inspector(_mlp()).set_version("nope")
    with pytest.raises(BendingError, match="unknown version 'nope'"), Inspector(_mlp()).interpolate({"nope": 1.0}):
        pass


def test_version_of_another_architecture_is_rejected() -> None:
    with pytest.raises(BendingError, match="shape mismatch for '0.weight'"):
        Inspector(_mlp()).create_version("other", nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))


def test_existing_version_is_not_silently_overwritten() -> None:
    inspector = Inspector(_mlp()).write("v")
    with pytest.raises(BendingError, match="already exists"):
        inspector.create_version("v")


def test_ambiguous_module_name_asks_for_a_node() -> None:
    inspector = Inspector(torchvision.models.resnet18(num_classes=10))
    with pytest.raises(BendingError, match="layer1_0_relu, layer1_0_relu_1"):
        inspector.bend(Scale(0.0), "layer1.0.relu")


def test_bending_errors_are_fusion_errors() -> None:
    assert issubclass(BendingError, FusionError) and issubclass(BendingError, ValueError)
