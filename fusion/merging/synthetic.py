"""Synthetic families of fine-tunes of one base, for tests, benchmarks and examples.

:func:`write_llama_family` builds a Hugging Face LLaMA model from a config (random init, nothing
downloaded), saves it as the base, and saves fine-tunes made by adding a sparse, per-model
perturbation to every weight, so their task vectors overlap partly and disagree in sign in places,
as real fine-tunes do.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["write_llama_family"]


def write_llama_family(folder: str | Path, count: int = 2, *, hidden: int = 64, layers: int = 2, vocab: int = 128,
                       intermediate: int | None = None, scale: float = 0.02, keep: float = 0.5, seed: int = 0,
                       max_shard_size: str = "5GB") -> list[Path]:
    """Write ``base`` and ``ft1`` ... ``ft<count>`` model folders under ``folder``; returns their paths.

    Each fine-tune adds ``scale * N(0, 1)`` to a random ``keep`` fraction of every weight's entries.
    Needs ``transformers``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 64),
                         vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    paths = [folder / "base"]
    model.save_pretrained(paths[0], max_shard_size=max_shard_size)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(1, count + 1):
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                noise = torch.randn(tensor.shape, generator=generator) * scale
                mask = torch.rand(tensor.shape, generator=generator) < keep
                tensor.copy_(base[name] + noise * mask)
        paths.append(folder / f"ft{i}")
        model.save_pretrained(paths[-1], max_shard_size=max_shard_size)
    return paths
