"""Experiment 07: permutation coverage of Hugging Face and timm transformers (the README's transformers table).

For every small transformer of ``tests/transformer_models.py`` (random init from a small config, no
download: GPT-2, BERT, DistilBERT, ViT, CLIP vision and text, LLaMA with GQA, Mistral, Qwen2, T5, the
Whisper encoder, Wav2Vec2, timm ViT/DeiT/Swin/EVA-02, and held-out families not named in the issue:
OPT, GPT-NeoX, BLOOM, Phi, RoBERTa, BART) it builds the spec and reports:

* the groups by kind: residual stream (channel groups through a norm or an embedding), whole heads
  (including a GQA block's query heads), dims inside a head (query/key, value), MLP (other channel
  groups);
* the refused unit sets with their reasons (the output layer aside);
* the share of parameter elements a random permutation of every group moves;
* the structural difference: the largest relative output change when the groups are randomly
  permuted on a float64 copy whose weights are re-drawn at O(1) scale (a correct spec gives ~1e-12;
  a wrong coupling ~1e-2 or more), and the float32 difference on the model itself.

``--update-readme README.md`` rewrites the table between ``<!-- transformers:start -->`` and
``<!-- transformers:end -->``.
"""

from __future__ import annotations

import copy
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import excommon as common
import torch
from torch import nn

from fusion import permutation_spec
from fusion.analysis.io import save_json, write_text
from fusion.checks import main_output, run_model
from fusion.coverage import permutation_coverage
from fusion.errors import DataError
from fusion.permute import permute, random_permutation
from fusion.spec import PermutationSpec

NAME = "ex07_transformer_coverage"
START, END = "<!-- transformers:start -->", "<!-- transformers:end -->"
QUICK_MODELS = ("gpt2", "bert", "llama", "timm_vit")
sys.path.insert(0, str(common.ROOT / "tests"))  # the model builders shared with the test suite


def group_kinds(model: nn.Module, spec: PermutationSpec) -> dict[str, int]:
    """Groups counted as residual / heads / head dims / MLP."""
    modules = dict(model.named_modules())
    counts = {"residual": 0, "heads": 0, "head dims": 0, "MLP": 0}
    for group in spec.groups:
        if group.kind == "heads":
            counts["heads"] += 1
        elif group.kind in ("head_qk", "head_v"):
            counts["head dims"] += 1
        else:
            owners = [modules.get(m.name.rpartition(".")[0]) for m in group.members]
            stream = any(isinstance(o, nn.Embedding) or "Norm" in type(o).__name__ for o in owners if o is not None)
            counts["residual" if stream else "MLP"] += 1
    return counts


def structural_difference(model: nn.Module, spec: PermutationSpec, inputs: Any, seed: int) -> float:
    """Relative output change of a random permutation on a float64 copy with O(1) re-drawn weights."""
    try:  # the library's checker, where this version has it
        from fusion.spec.verify import structural_difference as checker
    except ImportError:
        checker = None
    if checker is not None:
        return float(checker(model, spec, inputs, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    work = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for name, p in work.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.copy_(noise / fan_in**0.5 if p.dim() > 1 else 0.5 * noise + float(name.endswith("weight")))
    cast = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()} if isinstance(inputs, dict) \
        else (inputs.double() if inputs.is_floating_point() else inputs)
    permuted = permute(work, random_permutation(spec, seed=seed), spec)
    with torch.no_grad():
        a, b = main_output(run_model(work, cast)), main_output(run_model(permuted, cast))
    return float((a - b).abs().max() / a.abs().max())


def survey(name: str, seed: int) -> dict[str, Any]:
    from transformer_models import HELD_OUT_MODELS, build

    row: dict[str, Any] = {"model": name, "held_out": name in HELD_OUT_MODELS}
    try:
        model, inputs = build(name)
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        started = time.perf_counter()
        spec = permutation_spec(model, inputs)
        row["spec_seconds"] = time.perf_counter() - started
        coverage = permutation_coverage(model, inputs, spec=spec, seed=seed, label=name)
        refused = [s for s in spec.skipped if "output" not in s.reason]
        row.update(groups=len(spec.groups), kinds=group_kinds(model, spec), params_changed=coverage.params_changed,
                   rel_diff=coverage.max_rel_diff, structural=structural_difference(model, spec, inputs, seed),
                   refused=[f"{s.name}: {s.reason}" for s in refused], note="")
    except Exception as exc:  # a model that cannot be surveyed is a row of the table, with the reason
        row["note"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return row


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | params (M) | groups | residual | heads | head dims | MLP | refused (reasons) | "
             "param. elements moved | structural diff (float64) | rel. diff (float32) | spec s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        label = f"{r['model']} (held out)" if r.get("held_out") else r["model"]
        params = f"{r['params_m']:.2f}" if "params_m" in r else "-"
        if "groups" not in r:
            lines.append(f"| {label} | {params} | - | - | - | - | - | {r['note']} | - | - | - | - |")
            continue
        reasons = "; ".join(sorted({x.split(": ", 1)[1] for x in r["refused"]}))
        refused = f"{len(r['refused'])}" + (f": {reasons}" if reasons else "")
        refused = textwrap.shorten(refused, width=140, placeholder=" ...").replace("|", "\\|")
        kinds = r["kinds"]
        lines.append(f"| {label} | {params} | {r['groups']} | {kinds['residual']} | {kinds['heads']} | "
                     f"{kinds['head dims']} | {kinds['MLP']} | {refused} | {100 * r['params_changed']:.1f}% | "
                     f"{r['structural']:.1e} | {r['rel_diff']:.1e} | {r['spec_seconds']:.1f} |")
    return "\n".join(lines)


def update_readme(path: Path, table: str) -> Path:
    """Replace the text between the transformers markers of ``path`` with ``table`` (atomically)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise DataError(f"--update-readme: {str(path)!r} lacks the markers {START} ... {END}")
    return write_text(path, text[: start + len(START)] + "\n" + table + "\n" + text[end:])


def body(run: common.Run) -> dict[str, Any]:
    from transformer_models import MODELS, TORCHVISION_MODELS

    names = run.args.models or (list(QUICK_MODELS) if run.args.quick else
                                [n for n in MODELS if n not in TORCHVISION_MODELS])
    rows = []
    for name in names:
        rows.append(survey(name, run.args.seed))
        save_json(rows, run.out / "coverage.json")
        if run.progress:
            row = rows[-1]
            print(f"{name}: {row['note'] or row['kinds']}, structural {row.get('structural', float('nan')):.1e}",
                  flush=True)
    table = markdown_table(rows)
    write_text(run.out / "coverage.md", table + "\n")
    if run.args.update_readme is not None:
        update_readme(run.args.update_readme, table)
    checked = [r for r in rows if "groups" in r]
    worst = max((r["structural"] for r in checked), default=float("nan"))
    return {"experiment": NAME, "models": len(rows), "checked": len(checked), "worst_structural": worst, "rows": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment (see the module docstring) and return its results."""
    parser = common.parent_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="model names of tests/transformer_models.py (default: all)")
    parser.add_argument("--update-readme", type=Path, metavar="PATH",
                        help=f"rewrite the table between {START} and {END} in this file")
    return common.run_experiment(parser, body, argv, needs_data=False)


if __name__ == "__main__":
    common.script_main(main)
