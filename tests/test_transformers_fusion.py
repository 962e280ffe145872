"""Alignment and fusion of transformers: head-aware recovery, concatenation, merging, model loading.

Hugging Face and timm models are built from small configs with random weights (nothing is
downloaded); torchvision's ``nn.MultiheadAttention`` ViT serves where no optional package is needed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EQUIV_TOL, WEIGHT_TOL
from torchvision.models.vision_transformer import VisionTransformer
from transformer_models import build

import fusion
from fusion.align.nested import nesting
from fusion.checkpoint import build_architecture, load_model, save_model
from fusion.checks import main_output, run_model
from fusion.errors import CheckpointError

#: Models whose hidden permutation every alignment method must recover exactly.
RECOVERY_MODELS = ["gpt2", "bert", "llama", "vit", "timm_vit", "timm_deit"]
#: Models concatenated (GPT-2 ties its input and output embeddings).
CONCAT_MODELS = ["gpt2", "bert", "llama", "vit", "timm_vit", "distilbert"]


def max_state_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())


def torchvision_vit(heads: int = 8, width: int = 64) -> torch.nn.Module:
    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=heads, hidden_dim=width,
                             mlp_dim=2 * width, num_classes=10).eval()


# --------------------------------------------------------------------------------------------
# Head-aware alignment on nn.MultiheadAttention
# --------------------------------------------------------------------------------------------


def test_nesting_puts_within_head_groups_inside_their_head():
    model, x = torchvision_vit(heads=4, width=32), torch.randn(2, 3, 16, 16)
    tree = nesting(fusion.permutation_spec(model, x))
    assert len(tree.roots) == 2
    root = tree.roots[0]
    assert root.endswith(".heads")
    assert [(slot.size, len(slot.groups)) for slot in tree.slots[root]] == [(8, 4), (8, 4)]


@pytest.mark.parametrize("method", ["weight", "ot", "activation"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alignment_recovers_a_hidden_permutation_of_eight_heads_exactly(method, seed):
    torch.manual_seed(seed)
    model, x = torchvision_vit(), torch.randn(2, 3, 16, 16)
    spec = fusion.permutation_spec(model, x)
    scrambled = fusion.permute(model, fusion.random_permutation(spec, seed=seed + 10), spec)
    data = [torch.randn(32, 3, 16, 16) for _ in range(2)] if method == "activation" else None
    result = fusion.align(model, scrambled, spec=spec, method=method, data=data, progress=False)
    assert max_state_diff(model, result.model) <= WEIGHT_TOL
    assert fusion.verify_equivalence(scrambled, result.model, x) <= EQUIV_TOL


# --------------------------------------------------------------------------------------------
# Hugging Face and timm transformers
# --------------------------------------------------------------------------------------------


def built(name: str):
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    return build(name)


def member_pair(name: str, count: int = 2):
    """``count`` differently initialised models of one small config (weights at O(0.1) scale)."""
    members = []
    for k in range(count):
        model, x = built(name)
        generator = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        members.append(model)
    return members, x


def relative_gap(out, ref) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("method", ["weight", "ot", "activation"])
@pytest.mark.parametrize("name", RECOVERY_MODELS)
def test_alignment_recovers_a_hidden_permutation_of_a_transformer_exactly(name, method):
    model, x = built(name)
    spec = fusion.permutation_spec(model, x)
    assert any(g.kind == "heads" for g in spec.groups)
    scrambled = fusion.permute(model, fusion.random_permutation(spec, seed=5), spec)
    data = [x, x] if method == "activation" else None  # dict batches where the model takes keywords
    result = fusion.align(model, scrambled, spec=spec, method=method, data=data, progress=False)
    assert max_state_diff(model, result.model) == 0


def test_gqa_query_heads_nest_inside_their_key_value_head():
    model, x = built("llama")
    spec = fusion.permutation_spec(model, x)
    tree = nesting(spec)
    root = tree.roots[0]
    kinds = sorted(spec.group(slot.groups[0]).kind for slot in tree.slots[root])
    assert kinds == ["head_v", "heads"]  # per kv head: its query heads and its value dims


@pytest.mark.parametrize("name", CONCAT_MODELS)
def test_concatenated_transformer_computes_the_mean_of_its_members(name):
    members, x = member_pair(name)
    wide = fusion.concat_models(members, x)
    with torch.no_grad():
        mean = sum(main_output(run_model(m, x)) for m in members) / len(members)
        assert relative_gap(main_output(run_model(wide, x)), mean) <= 1e-5
    # the wide model has twice the heads: head-count attributes and the config follow the tensors
    wide_modules = dict(wide.named_modules())
    counts = [(getattr(wide_modules[n], a), getattr(m, a)) for n, m in members[0].named_modules()
              for a in ("num_heads", "num_attention_heads", "n_heads") if isinstance(getattr(m, a, None), int)]
    config = getattr(members[0], "config", None)
    for attr in ("num_attention_heads", "n_heads"):
        if isinstance(getattr(config, attr, None), int):
            counts.append((getattr(wide.config, attr), getattr(config, attr)))
    assert counts and all(wide_count == 2 * count for wide_count, count in counts)


def test_concatenating_four_llamas_keeps_the_mean_with_rms_norms_per_member():
    members, x = member_pair("llama", 4)
    wide = fusion.concat_models(members, x)
    with torch.no_grad():
        mean = sum(main_output(run_model(m, x)) for m in members) / 4
        assert relative_gap(main_output(run_model(wide, x)), mean) <= 1e-5
    assert wide.config.num_attention_heads == 4 * members[0].config.num_attention_heads
    assert wide.config.num_key_value_heads == 4 * members[0].config.num_key_value_heads


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "timm_vit"])
def test_transplanted_transformer_loads_strictly_into_the_member_class(name):
    members, x = member_pair(name)
    fused = fusion.fuse_ensemble(members, x, progress=False)
    fresh = type(members[0])(members[0].config) if hasattr(members[0], "config") else copy.deepcopy(members[0])
    fresh.load_state_dict(fused.state_dict(), strict=True)
    if hasattr(members[0], "config"):
        assert fused.config.to_dict() == members[0].config.to_dict()
    with torch.no_grad():
        assert torch.isfinite(main_output(run_model(fused, x))).all()


def test_transplanting_gpt2_keeps_its_input_and_output_embeddings_tied():
    members, x = member_pair("gpt2")
    wide = fusion.concat_models(members, x)
    assert wide.lm_head.weight is not wide.transformer.wte.weight  # untied in the wide model only
    fused = fusion.fuse_ensemble(members, x, progress=False)
    assert fused.lm_head.weight is fused.transformer.wte.weight
    assert fused.config.to_dict() == members[0].config.to_dict()
    assert members[0].lm_head.weight is members[0].transformer.wte.weight  # members untouched


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_merge_ot_fusion_and_repair_return_working_member_models(name):
    members, x = member_pair(name)
    data = [x, x]
    for fused in (fusion.merge(members, example_inputs=x, progress=False),
                  fusion.merge(members, example_inputs=x, data=data, repair=True, progress=False),
                  fusion.ot_fusion(members, x, progress=False)):
        assert type(fused) is type(members[0])
        assert all(fused.state_dict()[k].shape == v.shape for k, v in members[0].state_dict().items())
        with torch.no_grad():
            assert torch.isfinite(main_output(run_model(fused, x))).all()


def test_merging_a_transformer_with_a_permuted_copy_returns_the_original():
    model, x = built("gpt2")
    spec = fusion.permutation_spec(model, x)
    scrambled = fusion.permute(model, fusion.random_permutation(spec, seed=3), spec)
    merged = fusion.merge([model, scrambled], example_inputs=x, progress=False)
    assert max_state_diff(model, merged) <= WEIGHT_TOL


def test_repair_corrects_layer_norms_of_a_transformer():
    from fusion.fuse.norm import repair_locations

    model, x = built("bert")
    locations = repair_locations(model, [x])
    assert any(name.endswith("LayerNorm") for name in locations)


def test_interpolation_curve_and_cka_read_dict_batches_and_model_outputs():
    members, x = member_pair("bert")
    targets = torch.tensor([0, 2])
    curve = fusion.interpolation_curve(members[0], members[1], [(x, targets)], steps=3, progress=False)
    assert len(curve.loss) == 3
    cka = fusion.linear_cka(members[0], members[0], [x], ["bert.encoder.layer.0.output.dense"], channel_dim=-1)
    assert cka.values[0] == pytest.approx(1.0)


def test_language_model_evaluation_counts_one_sample_per_token():
    model, x = built("gpt2")
    targets = x["input_ids"]
    result = fusion.evaluate(model, [(x, targets)])
    assert result.num_samples == targets.numel()


# --------------------------------------------------------------------------------------------
# Model loading: hf:, hf-config:, timm:
# --------------------------------------------------------------------------------------------

GPT2_CONFIG = '{"n_embd": 16, "n_layer": 1, "n_head": 2, "vocab_size": 40, "n_positions": 16}'


def test_hf_config_name_builds_a_transformers_model_from_json():
    pytest.importorskip("transformers")
    model = build_architecture(f"hf-config:GPT2LMHeadModel:{GPT2_CONFIG}")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.n_embd == 16 and model.config.n_head == 2


def test_save_pretrained_folder_loads_as_checkpoint_and_names_its_architecture(tmp_path):
    pytest.importorskip("transformers")
    model = build_architecture(f"hf-config:GPT2LMHeadModel:{GPT2_CONFIG}")
    model.save_pretrained(tmp_path / "gpt")
    loaded = load_model(tmp_path / "gpt")
    assert max_state_diff(model, loaded) == 0
    fresh = build_architecture(f"hf:{tmp_path / 'gpt'}")
    assert type(fresh) is type(model) and max_state_diff(model, fresh) > 0  # freshly initialised


def test_state_dict_checkpoint_loads_into_an_hf_config_architecture(tmp_path):
    pytest.importorskip("transformers")
    name = f"hf-config:GPT2LMHeadModel:{GPT2_CONFIG}"
    model = build_architecture(name)
    save_model(model, tmp_path / "m.safetensors")
    assert max_state_diff(model, load_model(tmp_path / "m.safetensors", arch=name)) == 0


def test_timm_name_builds_without_pretrained_weights():
    pytest.importorskip("timm")
    model = build_architecture("timm:vit_tiny_patch16_224", num_classes=5, img_size=32, depth=1)
    assert model.head.out_features == 5


@pytest.mark.parametrize("name, kwargs, words", [
    ("hf:gpt2", {}, ["'gpt2'", "never downloads"]),
    ("timm:resnet18", {"pretrained": True}, ["'resnet18'", "never downloads"]),
    ("timm:no_such_model_x", {}, ["no_such_model_x"]),
    ("hf-config:NoSuchModel:{}", {}, ["NoSuchModel"]),
    ("hf-config:GPT2Model:{bad", {}, ["JSON"]),
])
def test_names_that_would_download_or_do_not_exist_raise_a_checkpoint_error(name, kwargs, words):
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    with pytest.raises(CheckpointError) as info:
        build_architecture(name, **kwargs)
    assert all(word in str(info.value) for word in words)


def test_cli_spec_of_an_hf_config_model_traces_token_ids(capsys):
    pytest.importorskip("transformers")
    from fusion.cli import main

    main(["spec", "--arch", f"hf-config:GPT2LMHeadModel:{GPT2_CONFIG}", "--input-shape", "8", "--quiet"])
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out and "heads" in out
