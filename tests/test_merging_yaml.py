"""``fusion merge-yaml``: mergekit-style configs, Hugging Face folders, sharding, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fusion
from fusion.cli.main import main
from fusion.merging import merge_yaml, parse_config
from fusion.merging.synthetic import write_llama_family


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return write_llama_family(tmp_path_factory.mktemp("llama"), 2, hidden=32, layers=3, vocab=64)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _ties(family: list[Path], **extra: str) -> str:
    base, ft1, ft2 = family
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: float32\n"
            + "".join(f"{k}: {v}\n" for k, v in extra.items()))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_yaml_merge_equals_the_in_memory_api(family, tmp_path):
    from transformers import LlamaForCausalLM

    out = merge_yaml(_write(tmp_path / "c.yml", _ties(family)), tmp_path / "out")
    models = [LlamaForCausalLM.from_pretrained(p) for p in family]
    merged = fusion.merge_task_vectors(models[0], models[1:], "ties", weights=[0.5, 0.5], density=0.5)
    on_disk = _tensors(out)
    for name, value in merged.state_dict().items():
        assert torch.equal(on_disk[name], value), name


def test_output_folder_has_config_readme_and_loads_in_transformers(family, tmp_path):
    from transformers import LlamaForCausalLM

    out = merge_yaml(_write(tmp_path / "c.yml", _ties(family)), tmp_path / "out")
    assert json.loads((out / "config.json").read_text()) == json.loads((family[0] / "config.json").read_text())
    readme = (out / "README.md").read_text()
    assert "ties" in readme and str(family[1]) in readme and "arXiv:2306.01708" in readme
    model = LlamaForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, _tensors(out)["lm_head.weight"])


def test_output_is_sharded_at_the_size_limit_with_an_index(family, tmp_path):
    out = merge_yaml(_write(tmp_path / "c.yml", _ties(family)), tmp_path / "out", max_shard_size="20KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    biggest_tensor = max(t.numel() * 4 for t in _tensors(out).values())
    assert all(s.stat().st_size <= max(20_000, biggest_tensor) + 10_000 for s in shards)
    assert _tensors(out).keys() == _tensors(merge_yaml(tmp_path / "c.yml", tmp_path / "one")).keys()


def test_torch_checkpoints_and_safetensors_files_are_accepted_as_inputs(family, tmp_path):
    state = _tensors(family[1])
    torch.save(state, tmp_path / "ft1.pt")
    save_file(_tensors(family[2]), str(tmp_path / "ft2.safetensors"))
    config = _ties([family[0], tmp_path / "ft1.pt", tmp_path / "ft2.safetensors"])
    a = _tensors(merge_yaml(_write(tmp_path / "a.yml", config), tmp_path / "a"))
    b = _tensors(merge_yaml(_write(tmp_path / "b.yml", _ties(family)), tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_passthrough_slices_stack_layers_and_update_the_layer_count(family, tmp_path):
    _, ft1, ft2 = family
    text = (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [0, 3]\n"
            f"  - sources:\n      - model: {ft2}\n        layer_range: [1, 3]\n")
    out = merge_yaml(_write(tmp_path / "s.yml", text), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    merged, second = _tensors(out), _tensors(ft2)
    assert torch.equal(merged["model.layers.4.mlp.up_proj.weight"], second["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(merged["lm_head.weight"], second["lm_head.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], _tensors(ft1)["model.embed_tokens.weight"])


def test_tokenizer_keys_are_ignored_with_a_note(family, tmp_path, caplog):
    config = parse_config(_ties(family, tokenizer_source="base"))
    assert any("tokenizer_source" in note for note in config.notes)


def test_unknown_yaml_key_is_named_with_its_line(family):
    text = _ties(family).replace("dtype: float32", "dtype: float32\nmerge_methd: ties")
    with pytest.raises(fusion.MergeConfigError, match=r"line 9: unknown key 'merge_methd'"):
        parse_config(text)


def test_density_outside_zero_one_in_yaml_names_the_line(family):
    with pytest.raises(fusion.MergeConfigError, match=r"line 5: parameter density=1.5 is outside \(0.0, 1.0\]"):
        parse_config(_ties(family).replace("density: 0.5}", "density: 1.5}", 1))


def test_missing_base_for_a_task_vector_method_is_refused(family):
    with pytest.raises(fusion.MergeConfigError, match="needs a base_model"):
        parse_config(_ties(family).replace(f"base_model: {family[0]}\n", ""))


def test_mismatched_architectures_fail_before_anything_is_written(family, tmp_path):
    other = write_llama_family(tmp_path / "other", 1, hidden=64, layers=3, vocab=64)[1]
    config = _write(tmp_path / "c.yml", _ties([family[0], family[1], other]))
    with pytest.raises(fusion.ArchitectureMismatchError, match="different shapes"):
        merge_yaml(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failure_mid_merge_leaves_no_partial_folder_and_keeps_an_existing_one(family, tmp_path):
    state = _tensors(family[2])
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("inf"))
    save_file(state, str(tmp_path / "bad.safetensors"))
    config = _write(tmp_path / "c.yml", _ties([family[0], family[1], tmp_path / "bad.safetensors"]))
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("old")
    with pytest.raises(fusion.NonFiniteWeightsError, match="model.norm.weight"):
        merge_yaml(config, existing)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert (existing / "keep.txt").read_text() == "old"


def test_cli_merges_and_reports_bad_configs_in_one_line(family, tmp_path, capsys):
    assert main(["merge-yaml", str(_write(tmp_path / "c.yml", _ties(family))), str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    bad = _write(tmp_path / "bad.yml", _ties(family) + "foo: 1\n")
    assert main(["merge-yaml", str(bad), str(tmp_path / "bad_out"), "-q"]) == 1
    assert "line 9: unknown key 'foo'" in capsys.readouterr().err
    assert not (tmp_path / "bad_out").exists()


def test_an_unavailable_device_is_refused_before_reading(family, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(fusion.DeviceMismatchError, match="CUDA is not available"):
        merge_yaml(_write(tmp_path / "c.yml", _ties(family)), tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()
