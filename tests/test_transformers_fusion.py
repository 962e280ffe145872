"""Alignment and fusion of transformers: head-aware recovery, concatenation, merging, model loading.

Hugging Face and timm models are built from small configs with random weights (nothing is
downloaded); torchvision's ``nn.MultiheadAttention`` ViT serves where no optional package is needed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EQUIV_TOL, WEIGHT_TOL
from torchvision.models.vision_transformer import VisionTransformer

import fusion
from fusion.align.nested import nesting
from fusion.checkpoint import build_architecture, load_model, save_model
from fusion.errors import CheckpointError


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
