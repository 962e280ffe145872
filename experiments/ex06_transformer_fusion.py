"""Experiment 06: aligning and fusing small transformers trained from different seeds (a character-level LM).

Transformers carry two permutation symmetries beyond an MLP's: whole attention heads, and the
query/key and value dimensions inside each head (plus the residual stream shared by every block).
Here two (and four) small GPT-style character models are trained from different seeds on text that
ships with Python itself (the standard library's own source files: offline and the same on every
machine), then:

* the loss barrier on the straight line between two members, naive and after weight matching and
  activation matching, each with the head groups on (head-aware, nested matching) and off (only the
  residual stream and MLP units are permuted; the attention internals stay in place);
* fusion one-shot and after the same fine-tuning budget: vanilla averaging, weight-matching merge,
  merge + REPAIR (LayerNorm affine maps and hidden Linear layers corrected), OT fusion and neuron
  transplantation, against the best member and the output ensemble (mean of logits), for 2 and 4
  members.

The model (``CharGPT``) is built from ``nn.MultiheadAttention`` with a causal mask and pre-norm
blocks; it returns next-character logits flattened to ``(batch * length, vocab)`` so that the
library's classification metrics read as per-character loss and accuracy. Outputs: ``results.json``
and ``barriers.png``.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import excommon as common
import torch
from torch import nn

from fusion import align, interpolation_curve, permutation_spec
from fusion.demo import FUSION_METHODS, compare_methods, format_table
from fusion.fuse.finetune import train_model
from fusion.spec import PermutationSpec

NAME = "ex06_transformer_fusion"
#: Standard-library files the text comes from (present in every CPython 3.9+).
TEXT_FILES = ("textwrap.py", "string.py", "fnmatch.py", "glob.py", "shlex.py", "pprint.py", "heapq.py", "bisect.py",
              "difflib.py", "argparse.py", "dataclasses.py", "functools.py", "inspect.py", "random.py", "tokenize.py",
              "pathlib.py", "threading.py", "typing.py", "enum.py", "calendar.py")
VOCAB = ["\n"] + [chr(c) for c in range(32, 127)] + ["\x00"]  # printable ASCII; anything else -> "\x00"


class CharGPT(nn.Module):
    """A pre-norm GPT: token + position embeddings, ``layers`` blocks of causal self-attention and
    an MLP, a final LayerNorm and a linear read-out; logits flattened to ``(batch * length, vocab)``."""

    def __init__(self, vocab: int = len(VOCAB), length: int = 32, width: int = 64, heads: int = 4, layers: int = 2,
                 mlp: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)  # (vocab, width)
        self.position = nn.Parameter(torch.randn(1, length, width) * 0.02)  # (1, length, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp * width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", torch.triu(torch.full((length, length), float("-inf")), diagonal=1),
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position[:, :length]  # (batch, length, width)
        for block in self.blocks:
            x = block(x, self.mask[:length, :length])
        return self.head(self.norm(x)).flatten(0, 1)  # (batch * length, vocab)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def stdlib_text(limit: int) -> str:
    """Up to ``limit`` characters of the standard library's source (the files of :data:`TEXT_FILES`)."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for name in TEXT_FILES:
        path = folder / name
        if path.is_file() and total < limit:
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
            total += len(parts[-1])
    if not parts:
        raise FileNotFoundError(f"none of {TEXT_FILES} found in {folder}")
    return "".join(parts)[:limit]


def encode(text: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(VOCAB)}
    unknown = index["\x00"]
    return torch.tensor([index.get(c, unknown) for c in text], dtype=torch.long)


def batches(tokens: torch.Tensor, count: int, size: int, length: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of ``size`` random windows: inputs (size, length), targets (size * length,)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        start = torch.randint(0, len(tokens) - length - 1, (size,), generator=generator)
        window = torch.stack([tokens[s:s + length + 1] for s in start.tolist()])
        out.append((window[:, :-1], window[:, 1:].reshape(-1)))
    return out


def without_heads(spec: PermutationSpec) -> PermutationSpec:
    """The spec with the attention-head groups removed (residual stream and MLP units only)."""
    return PermutationSpec(tuple(g for g in spec.groups if g.kind == "channels"), spec.skipped, spec.shapes,
                           spec.architecture)


def barrier_curves(model_a: nn.Module, model_b: nn.Module, example: Any, train: Any, test: Any, steps: int,
                   seed: int) -> dict[str, Any]:
    spec = permutation_spec(model_a, example)
    specs = {"heads on": spec, "heads off": without_heads(spec)}
    curves = {"naive": interpolation_curve(model_a, model_b, test, steps=steps, progress=False)}
    for method in ("weight", "activation"):
        for label, used in specs.items():
            aligned = align(model_a, model_b, spec=used, method=method, data=train, seed=seed, progress=False).model
            curves[f"{method} ({label})"] = interpolation_curve(model_a, aligned, test, steps=steps, progress=False)
    return {"curves": curves, "groups": {k: len(s.groups) for k, s in specs.items()}}


def body(run: common.Run) -> dict[str, Any]:
    quick = run.args.quick
    length, width, heads = 32, 64, 4
    train_steps = run.args.train_steps or (60 if quick else 1500)
    members_big = 2 if quick else 4
    steps = 3 if quick else 9
    tokens = encode(stdlib_text(120_000 if quick else 600_000))
    cut = int(0.9 * len(tokens))
    seed = run.args.seed
    test = batches(tokens[cut:], 4 if quick else 16, 32, length, seed + 1000)
    calibration = batches(tokens[:cut], 4 if quick else 16, 32, length, seed + 2000)
    tuning = batches(tokens[:cut], 10 if quick else 100, 32, length, seed + 3000)  # REPAIR + fine-tuning
    example = test[0][0][:2]

    members = []
    for k in range(members_big):
        with torch.random.fork_rng():
            torch.manual_seed(seed + k)
            model = CharGPT(length=length, width=width, heads=heads)
        data = batches(tokens[:cut], train_steps, 32, length, seed + k)
        members.append(train_model(model, data, epochs=1, lr=3e-3, seed=seed + k, progress=run.progress,
                                   inplace=True).eval())
    barriers = barrier_curves(members[0], members[1], example, calibration, test, steps, seed)
    if run.progress:
        print(", ".join(f"{k} {c.barrier:.3f}" for k, c in barriers["curves"].items()), flush=True)
    tables = {}
    for count in sorted({2, members_big}):
        rows = compare_methods(members[:count], example, tuning, test, methods=tuple(FUSION_METHODS),
                               finetune_methods=("best member", *FUSION_METHODS), finetune_epochs=1, lr=1e-3,
                               family=f"CharGPT x{count}", progress=run.progress, seed=seed)
        tables[count] = rows
        if run.progress:
            print(format_table(rows), flush=True)
    curves = barriers["curves"]
    common.line_plot(run.out / "barriers.png", [
        {"x": list(next(iter(curves.values())).alphas), "series": {k: list(c.loss) for k, c in curves.items()},
         "xlabel": "alpha", "ylabel": "test loss (nats / char)", "title": "interpolation A -> B"},
    ], title="Two CharGPTs: naive vs aligned, heads on/off")
    return {
        "experiment": NAME, "train_steps": train_steps, "model": {"length": length, "width": width, "heads": heads},
        "characters": len(tokens), "uniform_loss": math.log(len(VOCAB)),
        "groups": barriers["groups"],
        "barrier": {k: c.barrier for k, c in curves.items()},
        "curves": {k: c.to_dict() for k, c in curves.items()},
        "fusion": {str(count): [r.to_dict() for r in rows] for count, rows in tables.items()},
        "finetune_batches": len(tuning),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment (see the module docstring) and return its results."""
    parser = common.parent_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, help="training steps per member (default 1500; quick: 60)")
    return common.run_experiment(parser, body, argv, needs_data=False)


if __name__ == "__main__":
    common.script_main(main)
