"""Benchmark: cost of building a permutation spec, against torch-pruning's dependency graph alone.

For each torchvision model (random weights, 64x64 inputs, eval mode) and in the same process, the
minimum over ``--repeat`` runs (more for calls under 0.5 s, up to 20, except with ``--quick``) of:

* ``tp.DependencyGraph().build_dependency(model, x)`` (the peer: the graph the spec is derived from);
* the same plus ``get_all_groups(root_module_types=(nn.Module,))`` (the grouping the spec walks);
* ``fusion.permutation_spec(model, x, verify=False)`` and with the default ``verify=True`` (every group
  checked by a float64 forward pass with a random permutation, failing groups found by bisection);
* ``fusion.permute(model, random_permutation(spec), spec)`` (the permuted copy is checked to compute
  the same function);
* the structural verification alone (``fusion.spec.verify.verify_groups`` on the unverified groups:
  float64 deep copy with re-drawn weights, reference and permuted passes on the example and a fresh
  input, bisection if a group fails) against **one forward pass of that float64 copy** on the example
  input. The ideal is about 4 passes plus the copy (2 inputs x reference and permuted).

Goal (from the issue): spec build <= 2x ``build_dependency``; verification a small multiple of two
float64 forward passes. When the ratio is above 2, the
worst model's ``permutation_spec`` call is profiled once with cProfile and the top costs are shown.

Usage::

    python benchmarks/bench_spec.py            # all models
    python benchmarks/bench_spec.py --quick    # ResNet-18 only
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import benchlib as common  # first: puts the repository on sys.path
import torch
import torch_pruning as tp
import torchvision
from torch import nn

import fusion
from fusion.spec.verify import structural_copy, verify_groups

#: Goal of the issue: spec build time / build_dependency time.
GOAL_RATIO = 2.0

#: Calls are repeated until they took this long in total (at most MAX_RUNS runs), and at least ``--repeat`` times.
MIN_SECONDS, MAX_RUNS = 0.5, 20

#: Cumulative costs shown in the profile breakdown (phases of ``permutation_spec``).
PHASES = ("permutation_spec", "_build_graph", "build_dependency", "_all_groups", "get_all_groups", "_draft_group",
          "_groups_from_draft", "_attention_groups", "_check_indices", "verify_groups", "structural_copy", "_redraw",
          "difference", "_forward", "permute_state_dict", "module.py:state_dict")


def _vit() -> nn.Module:
    return torchvision.models.vit_b_16(image_size=64)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "vgg11_bn": torchvision.models.vgg11_bn,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "densenet121": torchvision.models.densenet121,
    "convnext_tiny": torchvision.models.convnext_tiny,
    "efficientnet_b0": torchvision.models.efficientnet_b0,
    "regnet_y_400mf": torchvision.models.regnet_y_400mf,
    "vit_b_16": _vit,
}
QUICK_MODELS = ("resnet18",)


def _tp_build(model: nn.Module, x: torch.Tensor, groups: bool) -> Any:
    graph = tp.DependencyGraph().build_dependency(model, x, verbose=False)
    if groups:
        return list(graph.get_all_groups(root_module_types=(nn.Module,)))
    return graph


def measure(name: str, repeat: int, seed: int, warmup: bool = False,
            min_seconds: float = MIN_SECONDS) -> dict[str, Any]:
    """Times (best of ``repeat``) of the peer and of this project on one model.

    ``warmup`` runs every call once untimed first (the first trace in a process pays lazy initialisation);
    calls are repeated until they took ``min_seconds`` in total (at most ``MAX_RUNS`` times).
    """
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    x = torch.randn(1, 3, 64, 64)
    unverified = fusion.permutation_spec(model, x, verify=False).groups
    copy64, x64 = structural_copy(model, seed), x.double()

    def forward64() -> Any:
        with torch.no_grad():
            return copy64(x64)

    calls = {
        "fwd64_s": forward64,
        "verify_s": lambda: verify_groups(model, x, unverified, seed),
        "tp_build_s": lambda: _tp_build(model, x, groups=False),
        "tp_build_groups_s": lambda: _tp_build(model, x, groups=True),
        "spec_noverify_s": lambda: fusion.permutation_spec(model, x, verify=False),
        "spec_s": lambda: fusion.permutation_spec(model, x),
    }
    runs: dict[str, list[float]] = {key: [] for key in calls}
    results: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in calls.values() if warmup else ():
            call()
        # Interleaved rounds, so that load from other processes hits every tool alike; cheap calls get more
        # runs, since their minimum is the noisiest.
        while True:
            pending = [key for key in calls if len(runs[key]) < repeat
                       or (sum(runs[key]) < min_seconds and len(runs[key]) < MAX_RUNS)]
            if not pending:
                break
            for key in pending:
                results[key], timing = common.time_call(calls[key])
                runs[key].append(timing.best)
    spec = results["spec_s"]
    perms = fusion.random_permutation(spec, seed=seed)
    permuted, permute_timing = common.time_call(lambda: fusion.permute(model, perms, spec), repeat)
    x_check = torch.randn(4, 3, 64, 64)
    row: dict[str, Any] = {key: min(values) for key, values in runs.items()}
    row.update(
        model=name,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        groups=len(spec.groups),
        skipped=len(spec.skipped),
        permute_s=permute_timing.best,
        permute_rel_diff=fusion.verify_equivalence(model, permuted, x_check),
        runs=runs,
    )
    row["verify_over_fwd64"] = row["verify_s"] / row["fwd64_s"]
    row["refused_by_verification"] = len(unverified) - len(spec.groups)
    row["ratio_spec"] = row["spec_s"] / row["tp_build_s"]
    row["ratio_spec_noverify"] = row["spec_noverify_s"] / row["tp_build_s"]
    row["ratio_spec_vs_groups"] = row["spec_s"] / row["tp_build_groups_s"]
    return row


def profile_spec(name: str, seed: int) -> dict[str, Any]:
    """cProfile of one ``permutation_spec`` call (verify=True) on model ``name``."""
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return common.profile_call(lambda: fusion.permutation_spec(model, x), top=12, focus=PHASES)


COLUMNS = {
    "model": "model", "params_m": "params (M)", "groups": "groups", "skipped": "skipped",
    "tp_build_s": "tp build s", "tp_build_groups_s": "tp build+groups s", "spec_noverify_s": "spec verify=False s",
    "spec_s": "spec s", "ratio_spec_noverify": "verify=False / build", "ratio_spec": "spec / build",
    "ratio_spec_vs_groups": "spec / (build+groups)", "permute_s": "permute s", "permute_rel_diff": "permute rel. diff",
}
VERIFY_COLUMNS = {
    "model": "model", "groups": "groups", "refused_by_verification": "refused by verification",
    "fwd64_s": "float64 forward s", "verify_s": "verification s", "verify_over_fwd64": "verification / float64 forward",
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser("spec", __doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None, help="models to measure")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    names = args.models or (QUICK_MODELS if args.quick else tuple(MODELS))
    repeat = args.repeat or (1 if args.quick else 3)
    min_seconds = 0.0 if args.quick else MIN_SECONDS
    rows = [measure(name, repeat, args.seed, warmup=i == 0, min_seconds=min_seconds) for i, name in enumerate(names)]
    table = common.markdown_table(rows, COLUMNS)
    sections = [(f"Spec build vs torch-pruning (64x64 inputs, best of >= {repeat} runs, {args.threads} thread(s))",
                 table),
                ("Structural verification cost, in float64 forward passes of the re-drawn copy (batch 1, 64x64)",
                 common.markdown_table(rows, VERIFY_COLUMNS))]
    worst = max(rows, key=lambda r: r["ratio_spec"])
    met = [r["model"] for r in rows if r["ratio_spec"] <= GOAL_RATIO]
    notes = [
        f"Goal spec build <= {GOAL_RATIO:g}x build_dependency: met on {len(met)}/{len(rows)} models"
        + (f" ({', '.join(met)})" if met else "") + f"; worst ratio {worst['ratio_spec']:.1f}x on {worst['model']} "
        f"({worst['ratio_spec_noverify']:.1f}x with verify=False).",
        "Verification costs {:.1f}x-{:.1f}x one float64 forward pass (median {:.1f}x).".format(
            min(r["verify_over_fwd64"] for r in rows), max(r["verify_over_fwd64"] for r in rows),
            sorted(r["verify_over_fwd64"] for r in rows)[len(rows) // 2]),
    ]
    profile = None
    if worst["ratio_spec"] > GOAL_RATIO and not args.no_profile:
        profile = profile_spec(worst["model"], args.seed)
        sections.append((f"Where the time goes: permutation_spec({worst['model']}) under cProfile, "
                         f"{profile['total']:.2f} s (phases, cumulative)", common.profile_table(profile, "focus")))
        sections.append(("Top functions by own time", common.profile_table(profile, "by_own_time")))
        top = profile["by_own_time"][0]
        notes.append(f"Top own-time cost in the profile: {top['function']} ({top['own_s']:.2f} s of "
                     f"{profile['total']:.2f} s).")
    results = {"rows": rows, "goal_ratio": GOAL_RATIO, "profile": profile, "repeat": repeat}
    common.report(args, "spec", sections, results, notes)
    return results


if __name__ == "__main__":
    main()
