"""Transformers: model I/O (keyword inputs, ModelOutputs) and head-aware permutation specs.

Hugging Face and timm models are built from small configs with random init (no download); both
libraries are optional, so their tests are skipped where they are not installed.
"""

from __future__ import annotations

import pytest
import torch

from fusion.checks import main_output, move_inputs, run_model, split_inputs
from fusion.errors import ExampleInputError
from fusion.spec import relative_difference

transformers = pytest.importorskip("transformers")


def _gpt2():
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _ids(batch: int = 2, length: int = 6, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


# ------------------------------------------------------------------------------------------------
# Model I/O
# ------------------------------------------------------------------------------------------------


def test_batch_encoding_is_keyword_inputs():
    ids = _ids()
    encoding = transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    moved = move_inputs(encoding, "cpu")
    assert isinstance(moved, dict) and set(moved) == {"input_ids", "attention_mask"}
    assert split_inputs(encoding) == ((), dict(encoding))
    model = _gpt2()
    with torch.no_grad():
        out = main_output(run_model(model, encoding))
    assert out.shape == (2, 6, 50)


def test_main_output_of_a_model_output_is_its_logits_not_its_cache():
    model = _gpt2()
    with torch.no_grad():
        out = model(input_ids=_ids(), use_cache=True)
    assert out.past_key_values is not None
    assert main_output(out) is out.logits
    assert main_output(out.to_tuple()) is out.logits


def test_main_output_of_an_encoder_is_its_last_hidden_state():
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                                     vocab_size=50, max_position_embeddings=16)
    with torch.no_grad():
        out = transformers.BertModel(config).eval()(input_ids=_ids())
    assert main_output(out) is out.last_hidden_state


def test_main_output_skips_the_loss_and_non_tensors():
    logits = torch.randn(2, 3)
    assert main_output({"loss": torch.tensor(1.0), "cache": object(), "scores": logits}) is logits
    assert main_output((torch.tensor([1, 2]), [logits])) is logits
    with pytest.raises(ExampleInputError, match="no floating-point tensor"):
        main_output((torch.tensor([1, 2]), None))


def test_relative_difference_ignores_caches():
    model = _gpt2()
    ids = _ids()
    with torch.no_grad():
        a, b = model(input_ids=ids, use_cache=True), model(input_ids=ids, use_cache=False)
    assert relative_difference(a, b) == 0.0


def test_positional_inputs_landing_in_the_cache_give_a_clear_error():
    ids = _ids()
    with pytest.raises(ExampleInputError, match=r"forward\(input_ids=\(2, 6\), \w+=\(2, 6\)\).*pass a dict of keyword tensors"):
        run_model(_gpt2(), (ids, torch.ones_like(ids)))
