"""Specification of fusion.checkpoint: building models by name, reading and writing state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion.checkpoint import (
    architecture_metadata,
    build_architecture,
    load_model,
    load_state_dict,
    read_metadata,
    resolve_constructor,
    save_model,
)
from fusion.errors import CheckpointError
from fusion.models import MLP, SmallResNet, VGGSmall


def _mlp() -> MLP:
    return MLP(in_features=64, hidden=(8, 8), num_classes=10)


def _same_state(a: nn.Module | dict, b: nn.Module | dict) -> bool:
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class TiedModel(nn.Module):
    """Two layers sharing one weight tensor (safetensors refuses shared memory unless copied)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_then_load_round_trips_every_tensor(tmp_path, suffix) -> None:
    model = SmallResNet(in_channels=1, width=4)
    path = save_model(model, tmp_path / f"model{suffix}")
    loaded = load_model(path, "resnet", num_classes=10, width=4)
    assert isinstance(loaded, SmallResNet)
    assert _same_state(model, loaded)


def test_save_model_leaves_the_model_untouched(tmp_path) -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_model(model, tmp_path / "m.safetensors")
    assert _same_state(before, model)


def test_safetensors_metadata_names_the_architecture(tmp_path) -> None:
    model = VGGSmall(in_channels=1, widths=(4, 8), hidden=(8,), num_classes=3)
    metadata = architecture_metadata("vgg", widths=[4, 8], hidden=[8], num_classes=3)
    path = save_model(model, tmp_path / "vgg.safetensors", metadata=metadata)
    assert read_metadata(path)["fusion.arch"] == "vgg"
    loaded = load_model(path)  # no architecture given: read from the file
    assert _same_state(model, loaded)


def test_safetensors_without_metadata_needs_an_architecture(tmp_path) -> None:
    path = save_model(_mlp(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="does not name its architecture"):
        load_model(path)


def test_models_with_shared_tensors_are_saved_as_safetensors(tmp_path) -> None:
    model = TiedModel()
    path = save_model(model, tmp_path / "tied.safetensors")
    state = load_state_dict(path)
    assert torch.equal(state["first.weight"], state["second.weight"])


def test_wrapped_and_data_parallel_state_dicts_are_unwrapped(tmp_path) -> None:
    model = _mlp()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "train.pt")
    assert _same_state(model, load_model(tmp_path / "train.pt", "mlp", hidden=[8, 8]))


def test_load_model_returns_eval_mode_on_the_requested_device(tmp_path) -> None:
    path = save_model(SmallResNet(in_channels=1, width=4), tmp_path / "r.pt")
    loaded = load_model(path, "resnet", width=4, device="cpu")
    assert not loaded.training
    assert next(loaded.parameters()).device.type == "cpu"


def test_module_colon_class_resolves_any_importable_constructor() -> None:
    model = build_architecture("fusion.models:VGGSmall", num_classes=4, input_shape=(3, 8, 8), widths=(4,), hidden=())
    assert isinstance(model, VGGSmall)
    assert model.features[0].in_channels == 3
    assert model.classifier[-1].out_features == 4


def test_input_shape_fills_in_features_of_constructors_that_take_it() -> None:
    linear = build_architecture("torch.nn:Linear", input_shape=(1, 8, 8), out_features=5)
    assert (linear.in_features, linear.out_features) == (64, 5)


def test_torchvision_names_build_without_weights_with_num_classes() -> None:
    model = build_architecture("resnet18", num_classes=7, input_shape=(3, 32, 32))
    assert model.fc.out_features == 7
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_architecture_suggests_close_names() -> None:
    with pytest.raises(CheckpointError, match="resnet18"):
        resolve_constructor("resnet1")


@pytest.mark.parametrize(
    ("name", "message"),
    [("no_such_module_xyz:Net", "cannot import module"), ("torch.nn:NoSuchLayer", "has no attribute"),
     ("torch:__version__", "not a class or function"), ("", "non-empty")],
)
def test_bad_module_class_names_raise_checkpoint_error(name, message) -> None:
    with pytest.raises(CheckpointError, match=message):
        build_architecture(name)


def test_constructor_errors_become_checkpoint_errors() -> None:
    with pytest.raises(CheckpointError, match="cannot build architecture 'mlp'"):
        build_architecture("mlp", no_such_argument=1)


def test_constructors_that_return_no_module_are_rejected() -> None:
    with pytest.raises(CheckpointError, match="not a torch.nn.Module"):
        build_architecture("collections:OrderedDict")


def test_missing_checkpoint_is_named(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "absent.pt", "mlp")


def test_a_folder_is_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="is not a file"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize(("name", "content"), [("junk.pt", b"not a checkpoint"), ("junk.safetensors", b"{}"),
                                               ("zip.pt", b"PK\x03\x04broken")])
def test_unreadable_files_raise_checkpoint_error(tmp_path, name, content) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict(path)


def test_objects_that_are_not_state_dicts_are_rejected(tmp_path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a non-empty state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_state_dict_of_another_architecture_names_the_mismatch(tmp_path) -> None:
    path = save_model(_mlp(), tmp_path / "mlp.pt")
    with pytest.raises(CheckpointError, match="does not fit architecture 'resnet'.*missing"):
        load_model(path, "resnet")


def test_state_dict_of_another_width_names_the_shapes(tmp_path) -> None:
    path = save_model(_mlp(), tmp_path / "mlp.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*layers\.1\.weight \(8, 64\) vs \(16, 64\)"):
        load_model(path, "mlp", hidden=[16, 8])


def test_failed_write_leaves_an_existing_checkpoint_unchanged(tmp_path) -> None:
    path = save_model(_mlp(), tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="strings"):
        save_model(SmallResNet(width=4), path, metadata={"epochs": 3})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("key", ["model_state", "state_dict", "model_state_dict", "model"])
def test_training_checkpoints_wrapping_the_state_dict_load_and_name_the_key(tmp_path, caplog, key) -> None:
    model = _mlp()
    torch.save({"epoch": 200, key: model.state_dict(), "optimizer_state": {"lr": torch.tensor(0.1)}},
               tmp_path / "checkpoint-200.pt")
    with caplog.at_level("INFO", logger="fusion.checkpoint"):
        loaded = load_model(tmp_path / "checkpoint-200.pt", "mlp", hidden=[8, 8])
    assert _same_state(model, loaded)
    assert f"under key {key!r}" in caplog.text


def test_distributed_and_compiled_prefixes_are_removed(tmp_path) -> None:
    model = _mlp()
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "c.pt")
    assert _same_state(model, load_model(tmp_path / "c.pt", "mlp", hidden=[8, 8]))


def test_a_wrapper_without_a_state_dict_lists_its_keys(tmp_path) -> None:
    torch.save({"epoch": 3, "notes": "none"}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="model_state"):
        load_model(tmp_path / "empty.pt", "mlp", hidden=[8, 8])
