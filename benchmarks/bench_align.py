"""Benchmark: weight matching with this project against the ``rebasin`` package (PyPI), and its scaling.

For each pair of models (A, B) of one architecture and in the same process:

* this project: ``fusion.permutation_spec(A, x)`` then ``fusion.align(A, B, spec=spec, method="weight",
  max_iter=100)`` (the two together are exactly ``align(A, B, x)``; the spec's share is shown);
* the peer: ``rebasin.PermutationCoordinateDescent(A', B', x).rebasin(max_iterations=100)`` on deep
  copies (it permutes ``B'`` in place), tracing included.

Both results are judged from the returned models' state dicts, computed the same way:

* objective: sum over all parameters (not buffers) of ``<A, B'>`` in float64 (higher is better);
* moved: the fraction of B's parameter elements whose value changed;
* relative output difference ``max|f_B(x) - f_B'(x)| / max|f_B(x)|`` on a held-out batch
  (``fusion.verify_equivalence``): a permutation must not change the function (a fast but wrong
  result shows up here). BatchNorm running statistics are first filled from random batches, as in a
  trained network, so that a tool which forgets to permute them is caught; the difference is also
  shown with every BN's statistics reset to their defaults in both B and B' (as in a freshly
  initialised network), which isolates errors in the permutation of the weights themselves.

Models: torchvision ResNet-18, ResNet-50 and MobileNet-V2 (random init, ``num_classes=10``, 64x64
inputs) and two MLPs trained briefly on scikit-learn's digits. ``--quick`` keeps the digits MLPs only.
Then a transformer: Hugging Face GPT-2 small (default config, 124M parameters, random init, a batch of
16 tokens; head-aware groups) against the CNN of about its size, ``wide_resnet101_2`` (127M), in the
same run (the peer too, if it runs on GPT-2; ``--quick``: a 2-layer GPT-2 against ResNet-18).
Then how this project's time grows with MLP width and depth (random init, A and B differently seeded).

The peer needs ``pip install rebasin torchview`` and the ``graphviz`` system package
(``apt-get install graphviz``); without it the peer's rows are skipped with a message.

Usage::

    python benchmarks/bench_align.py [--quick] [--no-peer] [--profile]
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from typing import Any

import benchlib as common  # first: puts the repository on sys.path
import torch
import torchvision
from torch import nn

import fusion
from fusion.data import load_digits_data
from fusion.models import MLP

MAX_ITER = 100
#: Relative output difference up to which a permuted model counts as the same function (float32).
SAME_FUNCTION_TOL = 1e-4
#: Goals of the issue: speed-up over the peer, objective >= the peer's, more elements permuted.
GOAL_SPEEDUP = 2.0
#: Profile focus: the phases of weight matching.
PHASES = ("align", "permutation_spec", "weight_matching", "layerwise_matching", "group_similarity", "_aligned_pair",
          "permute_axis", "unit_rows", "solve_assignment", "linear_sum_assignment", "matching_objective",
          "permute_state_dict", "fusion/permute.py:permute")

IMAGE = (3, 64, 64)
TORCHVISION = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
}


# --------------------------------------------------------------------------------------------
# Model pairs
# --------------------------------------------------------------------------------------------


def _fill_bn_statistics(model: nn.Module, shape: tuple[int, ...], seed: int) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics (forward passes in train mode), then eval()."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        generator = torch.Generator().manual_seed(seed)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(16, *shape, generator=generator) * 2 + 0.5)
    return model.eval()


def torchvision_pair(name: str, seed: int) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """Two differently initialised torchvision models with filled BN statistics, example and test inputs."""
    models = []
    for k in range(2):
        torch.manual_seed(seed + k)
        models.append(_fill_bn_statistics(TORCHVISION[name](num_classes=10), IMAGE, seed + k))
    generator = torch.Generator().manual_seed(seed + 100)
    example, test = torch.randn(1, *IMAGE, generator=generator), torch.randn(8, *IMAGE, generator=generator)
    return models[0], models[1], example, test


def digits_pair(seed: int, hidden: tuple[int, ...], epochs: int) -> tuple[nn.Module, nn.Module, torch.Tensor,
                                                                          torch.Tensor]:
    """Two MLPs trained on digits from different initialisations and batch orders."""
    split = load_digits_data(seed=seed, flatten=True)
    loader_seed = torch.Generator().manual_seed(seed)
    models = []
    for k in range(2):
        torch.manual_seed(seed + k)
        loader = torch.utils.data.DataLoader(split.train, batch_size=64, shuffle=True, generator=loader_seed)
        model = fusion.finetune(MLP(64, hidden, 10), loader, epochs=epochs, lr=1e-3, seed=seed + k, progress=False)
        models.append(model.eval())
    test_x = split.test.tensors[0]
    return models[0], models[1], test_x[:1], test_x[:64]


def random_mlp_pair(width: int, depth: int, seed: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Two differently seeded random MLPs (64 inputs, ``depth`` hidden layers of ``width``)."""
    models = []
    for k in range(2):
        torch.manual_seed(seed + k)
        models.append(MLP(64, (width,) * depth, 10).eval())
    return models[0], models[1], torch.randn(1, 64)


# --------------------------------------------------------------------------------------------
# The two tools and the common judge
# --------------------------------------------------------------------------------------------


def run_fusion(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """``permutation_spec`` + ``align(method="weight")``: the aligned model and the timings."""
    spec, spec_time = common.time_call(lambda: fusion.permutation_spec(model_a, x))
    result, match_time = common.time_call(
        lambda: fusion.align(model_a, model_b, method="weight", spec=spec, max_iter=MAX_ITER, progress=False))
    return {"model": result.model, "seconds": spec_time.best + match_time.best, "spec_s": spec_time.best,
            "sweeps": result.iterations, "error": None}


def run_rebasin(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, seed: int) -> dict[str, Any]:
    """rebasin's PermutationCoordinateDescent on copies (it permutes B in place): the result and the time."""
    from rebasin import PermutationCoordinateDescent

    copy_a, copy_b = copy.deepcopy(model_a), copy.deepcopy(model_b)
    sweeps = []

    def descend() -> None:
        torch.manual_seed(seed)  # rebasin draws its group order from torch's global generator
        solver = PermutationCoordinateDescent(copy_a, copy_b, x, logging_level=logging.ERROR)
        step = solver._calculate_permutations_step

        def counted(loop: Any) -> bool:
            sweeps.append(1)
            return step(loop)

        solver._calculate_permutations_step = counted  # count sweeps; the algorithm itself is untouched
        solver.rebasin(max_iterations=MAX_ITER)

    try:
        _, timing = common.time_call(descend)
    except Exception as exc:  # a peer failure is a result to report, not a crash of the benchmark
        return {"model": None, "seconds": None, "sweeps": None, "error": f"{type(exc).__name__}: {exc}"[:200]}
    a_changed = any(not torch.equal(p, q) for p, q in zip(model_a.state_dict().values(),
                                                          copy_a.state_dict().values()))
    return {"model": copy_b, "seconds": timing.best, "sweeps": len(sweeps), "error": None, "changed_a": a_changed}


def objective(model_a: nn.Module, model_b: nn.Module) -> float:
    """Sum over parameters of <A, B> in float64 (from the state dicts)."""
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    names = [name for name, _ in model_a.named_parameters()]
    return float(sum((state_a[k].double() * state_b[k].double()).sum() for k in names))


def moved_fraction(before: nn.Module, after: nn.Module) -> float:
    """Share of parameter elements whose value differs between two models of one architecture."""
    state_before, state_after = before.state_dict(), after.state_dict()
    names = [name for name, _ in before.named_parameters()]
    moved = sum(int((state_before[k] != state_after[k]).sum()) for k in names)
    return moved / sum(state_before[k].numel() for k in names)


def _reset_bn_statistics(model: nn.Module) -> nn.Module:
    """A copy with every BatchNorm's running statistics back at their defaults (mean 0, variance 1)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    return model


def judge(tool: str, outcome: dict[str, Any], model_a: nn.Module, model_b: nn.Module,
          x_test: torch.Tensor) -> dict[str, Any]:
    """One table row: the same measurements for either tool's aligned model."""
    row = {"tool": tool, "seconds": outcome["seconds"], "spec_s": outcome.get("spec_s"), "sweeps": outcome["sweeps"],
           "objective": None, "moved": None, "rel_diff": None, "rel_diff_reset": None, "same_function": None,
           "error": outcome["error"]}
    aligned = outcome["model"]
    if aligned is not None:
        rel_diff = fusion.verify_equivalence(model_b, aligned, x_test)
        # As in a freshly initialised network: tells a wrong weight permutation from unpermuted BN buffers.
        rel_diff_reset = fusion.verify_equivalence(_reset_bn_statistics(model_b), _reset_bn_statistics(aligned), x_test)
        moved = moved_fraction(model_b, aligned)
        row.update(objective=objective(model_a, aligned), moved=moved, moved_pct=100 * moved, rel_diff=rel_diff,
                   rel_diff_reset=rel_diff_reset, same_function=max(rel_diff, rel_diff_reset) <= SAME_FUNCTION_TOL)
    if outcome.get("changed_a"):
        row["error"] = "modified model A"
    return row


def compare(name: str, model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, x_test: torch.Tensor,
            peer: bool, seed: int) -> list[dict[str, Any]]:
    """Rows for one pair: unaligned B (reference objective), this project, and the peer if available."""
    baseline = {"tool": "unaligned B", "objective": objective(model_a, model_b), "moved": 0.0, "moved_pct": 0.0}
    rows = [baseline, judge("fusion", run_fusion(model_a, model_b, x), model_a, model_b, x_test)]
    if peer:
        rows.append(judge("rebasin", run_rebasin(model_a, model_b, x, seed), model_a, model_b, x_test))
    for row in rows:
        row["model"] = name
        row["params_m"] = sum(p.numel() for p in model_a.parameters()) / 1e6
    return rows


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Ratios against the goals for one model, or None without a (successful) peer row."""
    ours = next(r for r in rows if r["tool"] == "fusion")
    theirs = next((r for r in rows if r["tool"] == "rebasin"), None)
    if theirs is None or theirs["seconds"] is None:
        return None
    speedup = theirs["seconds"] / ours["seconds"]
    return {
        "model": ours["model"],
        "speed-up (rebasin s / fusion s)": speedup,
        "objective fusion - rebasin": ours["objective"] - theirs["objective"],
        "moved fusion - rebasin (pp)": 100 * (ours["moved"] - theirs["moved"]),
        "fusion same function": ours["same_function"],
        "rebasin same function": theirs["same_function"],
        "goals met": bool(speedup >= GOAL_SPEEDUP and ours["objective"] >= theirs["objective"]
                          and ours["moved"] > theirs["moved"] and ours["same_function"]),
    }


# --------------------------------------------------------------------------------------------
# A transformer against a CNN of the same size
# --------------------------------------------------------------------------------------------

#: GPT-2 small's default config (124M parameters) and, for --quick, a small one of the same shape.
GPT2_CONFIGS = {"full": {}, "quick": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 64}}
#: The CNN of about the same parameter count whose time is the same run's reference (quick: ResNet-18).
CNN_PEERS = {"full": "wide_resnet101_2", "quick": "resnet18"}


def gpt2_pair(quick: bool, seed: int) -> tuple[nn.Module, nn.Module, dict, dict]:
    """Two differently initialised GPT-2 language models (Hugging Face, random weights) and token batches."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**GPT2_CONFIGS["quick" if quick else "full"])
    models = []
    for k in range(2):
        torch.manual_seed(seed + k)
        models.append(GPT2LMHeadModel(config).eval())
    generator = torch.Generator().manual_seed(seed + 100)
    tokens = torch.randint(0, config.vocab_size, (9, 16), generator=generator)
    return models[0], models[1], {"input_ids": tokens[:1]}, {"input_ids": tokens[1:]}


def transformer_rows(args: Any, peer: bool) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Weight matching on GPT-2 (small) and on a CNN of about its size, in this run: rows and time ratio."""
    if common.optional_import("transformers") is None:
        return [], None
    cnn = CNN_PEERS["quick" if args.quick else "full"]
    TORCHVISION.setdefault(cnn, getattr(torchvision.models, cnn))
    gpt2_name = "GPT-2 small (HF)" if not args.quick else "GPT-2 2x64 (HF)"
    try:
        rows = compare(gpt2_name, *gpt2_pair(args.quick, args.seed), peer, args.seed)
    except fusion.FusionError as exc:  # an architecture this version cannot trace is a result, not a crash
        return [{"model": gpt2_name, "tool": "fusion", "error": f"{type(exc).__name__}: {exc}"[:200]}], None
    rows += compare(cnn, *torchvision_pair(cnn, args.seed), False, args.seed)
    ours = {r["model"]: r for r in rows if r["tool"] == "fusion"}
    ratio = {"transformer": gpt2_name, "CNN": cnn,
             "params transformer / CNN": ours[gpt2_name]["params_m"] / ours[cnn]["params_m"],
             "time transformer / CNN": ours[gpt2_name]["seconds"] / ours[cnn]["seconds"],
             "transformer same function": ours[gpt2_name]["same_function"]}
    return rows, ratio


# --------------------------------------------------------------------------------------------
# Scaling of this project's weight matching
# --------------------------------------------------------------------------------------------


def scaling_row(width: int, depth: int, seed: int) -> dict[str, Any]:
    """Time of spec + weight matching for one random MLP pair."""
    model_a, model_b, x = random_mlp_pair(width, depth, seed)
    outcome = run_fusion(model_a, model_b, x)
    match_s = outcome["seconds"] - outcome["spec_s"]
    return {"width": width, "hidden layers": depth, "params (M)": sum(p.numel() for p in model_a.parameters()) / 1e6,
            "total s": outcome["seconds"], "spec s": outcome["spec_s"], "matching s": match_s,
            "sweeps": outcome["sweeps"], "matching s / sweep": match_s / max(1, outcome["sweeps"]),
            "gain over unaligned": objective(model_a, outcome["model"]) - objective(model_a, model_b)}


def profile_alignment(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """cProfile of ``align(A, B, x, method="weight")`` (spec build included)."""
    return common.profile_call(lambda: fusion.align(model_a, model_b, x, method="weight", max_iter=MAX_ITER,
                                                    progress=False), top=12, focus=PHASES)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

COLUMNS = {"model": "model", "params_m": "params (M)", "tool": "tool", "seconds": "time s", "spec_s": "of which spec s",
           "sweeps": "sweeps", "objective": "objective <A,B'>", "moved_pct": "moved %", "rel_diff": "rel. output diff",
           "rel_diff_reset": "rel. diff, BN stats reset",
           "same_function": "same function", "error": "error"}


def _pairs(args: Any) -> list[tuple[str, Callable[[], tuple]]]:
    names = args.models or (["digits"] if args.quick else ["digits", *TORCHVISION])
    digits_hidden, digits_epochs = ((128, 128, 128), 2) if args.quick else ((512, 512, 512), 5)
    return [
        (f"digits MLP {'x'.join(map(str, digits_hidden))} (trained)",
         lambda: digits_pair(args.seed, digits_hidden, digits_epochs)) if name == "digits" else
        (name, lambda name=name: torchvision_pair(name, args.seed))
        for name in names
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser("align", __doc__.splitlines()[0])
    parser.add_argument("--no-peer", action="store_true", help="do not run rebasin even if it is installed")
    parser.add_argument("--profile", action="store_true", help="always profile the largest model's alignment")
    parser.add_argument("--models", nargs="+", choices=["digits", *TORCHVISION], default=None,
                        help="model pairs to compare (default: all; --quick: digits)")
    parser.add_argument("--no-transformer", action="store_true",
                        help="skip the GPT-2 small vs wide_resnet101_2 comparison (needs transformers)")
    parser.add_argument("--widths", nargs="+", type=int, default=None, help="MLP widths of the scaling study")
    parser.add_argument("--depths", nargs="+", type=int, default=None, help="MLP depths of the scaling study")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning's and torchview's tracing warnings
        return run(args)


def run(args: Any) -> dict[str, Any]:
    """The benchmark for parsed arguments (see :func:`main`)."""
    notes = []
    peer = not args.no_peer and common.optional_import("rebasin") is not None
    if not peer:
        notes.append("Peer skipped: " + ("--no-peer given." if args.no_peer else
                     "the `rebasin` package is not installed (pip install rebasin torchview; apt-get install "
                     "graphviz) — only this project's numbers are shown."))

    rows, verdicts, profile_target = [], [], None
    for name, build in _pairs(args):
        model_a, model_b, x, x_test = build()
        model_rows = compare(name, model_a, model_b, x, x_test, peer, args.seed)
        rows += model_rows
        outcome = verdict(model_rows)
        if outcome is not None:
            verdicts.append(outcome)
        if (outcome is not None and outcome["speed-up (rebasin s / fusion s)"] < GOAL_SPEEDUP) or args.profile:
            profile_target = (name, model_a, model_b, x)  # the last (largest) such model is profiled

    sections = [(f"Weight matching, {MAX_ITER} sweeps at most, {args.threads} thread(s); same function = rel. diff "
                 f"<= {SAME_FUNCTION_TOL:g}", common.markdown_table(rows, COLUMNS))]
    if verdicts:
        sections.append((f"Against the goals (>= {GOAL_SPEEDUP:g}x faster, objective >= peer's, more moved, same "
                         "function)", common.markdown_table(verdicts)))

    transformer, ratio = ([], None) if args.no_transformer else transformer_rows(args, peer)
    if transformer:
        sections.append(("Transformer vs a CNN of about its size (weight matching with head groups, same run)",
                         common.markdown_table(transformer, COLUMNS)))
        if ratio is not None:
            sections.append(("Time ratio transformer / CNN", common.markdown_table([ratio])))

    widths = args.widths or ([256, 512] if args.quick else [256, 512, 1024, 2048, 4096])
    depths = args.depths or ([2, 4] if args.quick else [2, 4, 8, 16])
    width_rows = [scaling_row(w, 3, args.seed) for w in widths]
    depth_rows = [scaling_row(512, d, args.seed) for d in depths]
    sections += [("Scaling with width (MLP, 3 hidden layers, random init)", common.markdown_table(width_rows)),
                 ("Scaling with depth (MLP, width 512, random init)", common.markdown_table(depth_rows))]

    profile = None
    if profile_target is not None:
        name, model_a, model_b, x = profile_target
        profile = profile_alignment(model_a, model_b, x)
        sections.append((f"Where the time goes: align({name}) under cProfile, {profile['total']:.2f} s "
                         "(phases, cumulative)", common.profile_table(profile, "focus")))
        sections.append(("Top functions by own time", common.profile_table(profile, "by_own_time")))
    results = {"rows": rows, "verdicts": verdicts, "transformer": transformer, "transformer_ratio": ratio,
               "width": width_rows, "depth": depth_rows, "profile": profile,
               "peer": peer, "max_iter": MAX_ITER}
    common.report(args, "align", sections, results, notes)
    return results


if __name__ == "__main__":
    main()
