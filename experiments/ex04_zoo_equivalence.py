"""Experiment 04: how much of each torchvision classifier the permutation spec covers; does permuting keep the function?

For every model of the torchvision classification zoo (or a handful with ``--quick``) built without
pretrained weights, the permutation spec is derived (``fusion.permutation_spec``, which also checks
every group on the model) and a random permutation of all groups is applied
(``fusion.permutation_coverage``). The table reports the number of groups, the share of hidden unit
sets that are permutable, the share of parameter elements the permutation moves, the largest relative
output difference between the model and its permutation (float32, the model's own weights), the
structural difference (the same permutation on a float64 copy with every parameter re-drawn at O(1):
<= 1e-9 means the symmetry holds for all weight values), the refused unit sets by kind
(``SkippedGroup.kind``; the output layer is always one) and the time taken by the spec.

So that the check means something on randomly initialised models, BatchNorm running statistics are
first randomised by a few train-mode forward passes on random inputs, and weight matrices that
torchvision initialises to zero (ViT's classification head) get small random values: otherwise the
output would not depend on the permuted layers. Inputs are 64x64 (224x224 for ViT, Swin and MaxViT,
which need that size; 299x299 for Inception v3, whose auxiliary head needs it in train mode). Models
that cannot be built or traced are listed with the reason. ``coverage.json`` is rewritten after every
model, and ``--resume`` reuses its rows after an interruption. Outputs: ``coverage.md`` and
``coverage.json``; with ``--update-readme README.md`` the table replaces the text between
``<!-- coverage:start -->`` and ``<!-- coverage:end -->`` in that file.
"""

from __future__ import annotations

import fnmatch
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import excommon as common
import torch
import torchvision
from torch import nn

from fusion import permutation_coverage, permutation_spec
from fusion.analysis.io import load_json, save_json, write_text
from fusion.errors import DataError

NAME = "ex04_zoo_equivalence"
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"

#: The classification families of the survey (fnmatch patterns over torchvision's model names).
ZOO_PATTERNS = (
    "resnet*", "wide_resnet*", "resnext*", "vgg*_bn", "alexnet", "squeezenet*", "densenet*", "googlenet",
    "inception_v3", "mobilenet_v2", "mobilenet_v3_*", "mnasnet*", "efficientnet_b*", "efficientnet_v2_*",
    "regnet_*", "convnext_*", "vit_*", "swin_*", "maxvit_t", "shufflenet_v2_*",
)
QUICK_MODELS = ("resnet18", "mobilenet_v3_small", "squeezenet1_1", "efficientnet_b0", "convnext_tiny",
                "shufflenet_v2_x0_5")
INPUT_SIZES = {"vit_*": 224, "swin_*": 224, "maxvit_*": 224, "inception_v3": 299}


def zoo_models() -> list[str]:
    """The torchvision classification models matched by :data:`ZOO_PATTERNS`, in torchvision's order."""
    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in ZOO_PATTERNS)]


def input_size(name: str) -> int:
    """Side of the square input a model is checked on."""
    return next((size for pattern, size in INPUT_SIZES.items() if fnmatch.fnmatch(name, pattern)), 64)


def randomise(model: nn.Module, size: int, seed: int, passes: int = 3) -> None:
    """Randomise BatchNorm statistics (train-mode passes on random inputs) and all-zero weight matrices, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model.train()
            for _ in range(passes):
                model(torch.randn((4, 3, size, size), generator=generator))
    model.eval()


def survey(name: str, seed: int, max_params: float) -> dict[str, Any]:
    """One row of the table (``note`` explains a model that was not checked)."""
    size = input_size(name)
    row: dict[str, Any] = {"model": name, "input": size}
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = torchvision.models.get_model(name, weights=None)
    except Exception as exc:  # any construction failure is a row of the survey, not a crash
        return {**row, "note": f"cannot build: {type(exc).__name__}: {exc}"}
    count = sum(p.numel() for p in model.parameters())
    row["params_m"] = count / 1e6
    if count > max_params * 1e6:
        return {**row, "note": f"not run: {count / 1e6:.0f}M parameters > --max-params {max_params:g}M"}
    inputs = torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(seed))
    try:
        randomise(model, size, seed)
        started = time.perf_counter()
        spec = permutation_spec(model, inputs)
        row["spec_seconds"] = time.perf_counter() - started
        coverage = permutation_coverage(model, inputs, spec=spec, seed=seed, label=name)
    except Exception as exc:  # a model the toolkit cannot trace is reported with the reason
        return {**row, "note": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    return {**row, **{k: v for k, v in coverage.to_dict().items() if k != "model"}, "note": ""}


def _previous_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier (possibly interrupted) run, by model name."""
    if not path.is_file():
        return {}
    rows = load_json(path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "model" in r for r in rows):
        raise DataError(f"--resume: {str(path)!r} is not a coverage table written by this experiment")
    return {r["model"]: r for r in rows}


def refused_cell(kinds: dict[str, int]) -> str:
    """Refused unit sets by kind, e.g. ``output 1, unsupported 2`` (the output layer is always one)."""
    return ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())) or "-"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The coverage table in Markdown."""
    lines = ["| model | params (M) | input | groups | hidden groups permuted | param. elements changed | "
             "max rel. diff (float32) | structural diff (float64) | refused (by kind) | spec time (s) | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        if "groups" in r:
            structural = f"{r['structural_diff']:.1e}" if "structural_diff" in r else "-"
            cells = [f"{r['groups']}", f"{100 * r['hidden_groups_permuted']:.1f}%", f"{100 * r['params_changed']:.1f}%",
                     f"{r['max_rel_diff']:.1e}", structural, refused_cell(r.get("skipped_by_kind", {})),
                     f"{r['spec_seconds']:.1f}"]
        else:
            cells = ["-"] * 7
        params = f"{r['params_m']:.1f}" if "params_m" in r else "-"
        note = textwrap.shorten(str(r.get("note", "")), width=150, placeholder=" ...").replace("|", "\\|")
        lines.append(f"| {r['model']} | {params} | {r['input']} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def _marked(path: Path) -> tuple[str, int, int]:
    """The text of ``path`` and the positions of its coverage markers (checked before the survey runs)."""
    if not path.is_file():
        raise DataError(f"--update-readme: {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise DataError(f"--update-readme: {str(path)!r} lacks the markers {START} ... {END}")
    return text, start, end


def update_readme(path: Path, table: str) -> Path:
    """Replace the text between the coverage markers of ``path`` with ``table`` (atomically).

    Raises:
        DataError: the file is missing or lacks the markers (the file is then left unchanged).
    """
    text, start, end = _marked(path)
    return write_text(path, text[: start + len(START)] + "\n" + table + "\n" + text[end:])


def body(run: common.Run) -> dict[str, Any]:
    if run.args.update_readme is not None:
        _marked(run.args.update_readme)  # fail before the survey, not after it
    names = run.args.models or (list(QUICK_MODELS) if run.args.quick else zoo_models())
    done = _previous_rows(run.out / "coverage.json") if run.args.resume else {}
    rows = []
    for name in names:
        previous = done.get(name)
        reusable = previous is not None and previous.get("input") == input_size(name) and (
            "structural_diff" in previous or "groups" not in previous)
        row = previous if reusable else survey(name, run.args.seed, run.args.max_params)
        rows.append(row)
        save_json(rows, run.out / "coverage.json")  # progress survives an interruption (see --resume)
        if run.progress:
            status = row["note"] or f"{row['groups']} groups, max rel diff {row['max_rel_diff']:.1e}"
            print(f"{name}: {status}", flush=True)
    table = markdown_table(rows)
    checked = [r for r in rows if "groups" in r]
    header = (f"Permutation coverage of {len(checked)} of {len(rows)} torchvision classifiers (random initialisation, "
              f"seed {run.args.seed}; generated by experiments/{NAME}.py).\n\n")
    write_text(run.out / "coverage.md", header + table + "\n")
    if run.args.update_readme is not None:
        update_readme(run.args.update_readme, table)
    worst = max((r["max_rel_diff"] for r in checked), default=float("nan"))
    worst_structural = max((r.get("structural_diff", float("nan")) for r in checked), default=float("nan"))
    slowest = max((r["spec_seconds"] for r in checked), default=float("nan"))
    return {"experiment": NAME, "models": len(rows), "checked": len(checked), "worst_max_rel_diff": worst,
            "worst_structural_diff": worst_structural, "slowest_spec_seconds": slowest, "rows": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment (see the module docstring) and return its results."""
    parser = common.parent_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="torchvision model names (default: the zoo; quick: a handful)")
    parser.add_argument("--max-params", type=float, default=200.0,
                        help="skip models with more parameters than this many millions (memory)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the rows of models already in --output-dir/coverage.json (after an interruption)")
    parser.add_argument("--update-readme", type=Path, metavar="PATH",
                        help=f"rewrite the table between {START} and {END} in this file")
    return common.run_experiment(parser, body, argv, needs_data=False)


if __name__ == "__main__":
    common.script_main(main)
