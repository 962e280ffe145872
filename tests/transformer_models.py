"""Small transformers built from configs with random init (no download), with example inputs.

``build(name)`` returns ``(model, example_inputs)`` in eval mode; ``HF_MODELS``, ``TIMM_MODELS``
and ``TORCHVISION_MODELS`` list the names. Hugging Face and timm are imported lazily (optional).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

VOCAB, LENGTH = 61, 7


def _ids(batch: int = 2, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _text(extra: dict | None = None) -> dict:
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, **(extra or {})}


def _pixels(size: int = 32, channels: int = 3) -> dict:
    return {"pixel_values": torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(2))}


def _hf() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _gpt2():
    t = _hf()
    return t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16,
                                          bos_token_id=0, eos_token_id=0)), _text()


def _bert():
    t = _hf()
    config = t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                          vocab_size=VOCAB, max_position_embeddings=16, num_labels=3)
    return t.BertForSequenceClassification(config), _text({"token_type_ids": torch.zeros(2, LENGTH, dtype=torch.long)})


def _distilbert():
    t = _hf()
    config = t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=VOCAB,
                                max_position_embeddings=16, num_labels=3)
    return t.DistilBertForSequenceClassification(config), _text()


def _vit():
    t = _hf()
    config = t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                         image_size=32, patch_size=8, num_labels=5)
    return t.ViTForImageClassification(config), _pixels()


def _clip_vision():
    t = _hf()
    config = t.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, projection_dim=12)
    return t.CLIPVisionModelWithProjection(config), _pixels()


def _clip_text():
    t = _hf()
    config = t.CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=VOCAB, max_position_embeddings=16, projection_dim=12, eos_token_id=2)
    return t.CLIPTextModelWithProjection(config), _text()


def _decoder(kind: str):
    def build():
        t = _hf()
        common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=37, vocab_size=VOCAB, max_position_embeddings=16)
        config = getattr(t, f"{kind}Config")(**common)
        return getattr(t, f"{kind}ForCausalLM")(config), _text()
    return build


def _t5():
    t = _hf()
    config = t.T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=VOCAB,
                        decoder_start_token_id=0)
    return t.T5ForConditionalGeneration(config), _text({"decoder_input_ids": _ids(length=5)})


def _whisper():
    t = _hf()
    config = t.WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=37,
                             decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=37, num_mel_bins=8,
                             max_source_positions=10, vocab_size=VOCAB, num_labels=3, classifier_proj_size=12)
    features = torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(3))
    return t.WhisperForAudioClassification(config), {"input_features": features}


def _wav2vec2():
    t = _hf()
    config = t.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                              num_conv_pos_embedding_groups=4, vocab_size=VOCAB, num_labels=3)
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(4))
    return t.Wav2Vec2ForSequenceClassification(config), {"input_values": audio}


def _timm(name: str, **kwargs):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, **kwargs), _pixels(kwargs.get("img_size", 32))["pixel_values"]
    return build


def _torchvision(name: str, size: int):
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None), torch.randn(1, 3, size, size)
    return build


HF_MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "gpt2": _gpt2, "bert": _bert, "distilbert": _distilbert, "vit": _vit, "clip_vision": _clip_vision,
    "clip_text": _clip_text, "llama": _decoder("Llama"), "mistral": _decoder("Mistral"), "qwen2": _decoder("Qwen2"),
    "t5": _t5, "whisper_encoder": _whisper, "wav2vec2": _wav2vec2,
}
_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
TIMM_MODELS = {
    "timm_vit": _timm("vit_tiny_patch16_224", **_VIT),
    "timm_deit": _timm("deit_tiny_distilled_patch16_224", **_VIT),
    "timm_swin": _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4, embed_dim=16,
                       depths=(2, 2), num_heads=(2, 4), num_classes=5),
    "timm_eva02": _timm("eva02_tiny_patch14_224", img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=4,
                        num_classes=5),
}
TORCHVISION_MODELS = {"torchvision_swin_t": _torchvision("swin_t", 64), "torchvision_vit_b_16": _torchvision("vit_b_16", 224)}
MODELS = {**HF_MODELS, **TIMM_MODELS, **TORCHVISION_MODELS}


def build(name: str) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def _held_out(kind: str, model: str, **config):
    def build():
        t = _hf()
        return getattr(t, model)(getattr(t, f"{kind}Config")(**config)), _text()
    return build


#: Families not named in the issue, to check that nothing is tailored to the named ones.
HELD_OUT_MODELS = {
    "opt": _held_out("OPT", "OPTForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=37,
                     vocab_size=VOCAB, max_position_embeddings=16, word_embed_proj_dim=32),
    "gpt_neox": _held_out("GPTNeoX", "GPTNeoXForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=37, vocab_size=VOCAB, max_position_embeddings=16, rotary_pct=0.5),
    "bloom": _held_out("Bloom", "BloomForCausalLM", hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB),
    "phi": _held_out("Phi", "PhiForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, vocab_size=VOCAB, max_position_embeddings=16, partial_rotary_factor=0.5),
    "roberta": _held_out("Roberta", "RobertaForSequenceClassification", hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=37, vocab_size=VOCAB, max_position_embeddings=20,
                         num_labels=3),
    "bart": _held_out("Bart", "BartForConditionalGeneration", d_model=32, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                      vocab_size=VOCAB, max_position_embeddings=16),
    "falcon": _held_out("Falcon", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=VOCAB, new_decoder_architecture=True, num_kv_heads=2),
    "gpt_bigcode": _held_out("GPTBigCode", "GPTBigCodeForCausalLM", n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                             n_positions=16, multi_query=True),
    "gptj": _held_out("GPTJ", "GPTJForCausalLM", n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16,
                      rotary_dim=4),
}
MODELS.update(HELD_OUT_MODELS)
