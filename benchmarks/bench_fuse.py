"""Benchmark: time and peak memory of Neuron Transplantation (``fuse_ensemble``) and OT fusion on CPU.

Configurations: ``fusion.fuse_ensemble`` of 2, 4 and 8 torchvision ResNet-18s (random init,
``num_classes=10``, 32x32 inputs), ``fusion.ot_fusion`` (exact OT on weights) of 2 and 4, and
``fusion.concat_models`` of 2, 4 and 8 (the first step of transplantation, whose parameter bytes are
the "size of the concatenated model").

Memory method: every configuration runs in a fresh Python process (``--worker``). The process
imports torch and fusion, builds its members and collects garbage; the baseline is
``getrusage(RUSAGE_SELF).ru_maxrss`` at that point (the high-water mark so far, which includes the
interpreter, torch and the members). After the call the high-water mark is read again: "increase"
is the extra peak resident memory the call needed. A background thread also samples the RSS every
5 ms and records which functions of fusion / torch-pruning were running at the largest sample.
Resident memory counts everything (Python objects, tensors, allocator caches), unlike tracemalloc,
which does not see torch's tensor storage.

Goals (from the issue): peak memory <= 2x the concatenated model's parameter bytes (judged on the
increase over the baseline; the absolute peak is shown too), and transplantation faster than OT
fusion (the paper's claim), compared in the same run.

Usage::

    python benchmarks/bench_fuse.py            # ResNet-18, 2/4/8 members
    python benchmarks/bench_fuse.py --quick    # small ResNet, 2 members
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import warnings
from typing import Any

import benchlib as common  # first: puts the repository on sys.path

#: Goal of the issue: peak memory / concatenated model parameter bytes.
GOAL_MEMORY_RATIO = 2.0
TOOLS = ("concat", "transplant", "ot")
#: Profile focus: the phases of Neuron Transplantation.
PHASES = ("fuse_ensemble", "fusion/spec.py:permutation_spec", "build_concatenation", "_match_groups", "_fill",
          "_prune_to_members", "select", "position_scores", "_layer_scores", "_dependency_graph", "build_dependency",
          "get_pruning_group", "prune", "_remove_positions", "probe_forward", "copy.py:deepcopy")


def build_members(model: str, count: int, seed: int) -> list:
    """``count`` differently initialised members in eval mode."""
    import torch
    import torchvision

    from fusion.models import SmallResNet

    members = []
    for k in range(count):
        torch.manual_seed(seed + k)
        if model == "resnet18":
            members.append(torchvision.models.resnet18(num_classes=10).eval())
        else:  # the quick configuration
            members.append(SmallResNet(in_channels=3, width=8, num_classes=10).eval())
    return members


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in this (fresh) process and return its measurements."""
    import torch

    import fusion

    common.set_threads(args.threads)
    warnings.simplefilter("ignore")
    members = build_members(args.model, args.members, args.seed)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    call = {
        "concat": lambda: fusion.concat_models(members, x),
        "transplant": lambda: fusion.fuse_ensemble(members, x, progress=False),
        "ot": lambda: fusion.ot_fusion(members, x, progress=False),
    }[args.worker]
    if args.profile:
        return {"profile": common.profile_call(call, top=12, focus=PHASES)}
    gc.collect()
    baseline_peak, baseline_now = common.peak_rss_bytes(), common.current_rss_bytes()
    with common.PeakSampler() as sampler:
        start = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - start
    peak = common.peak_rss_bytes()
    return {
        "tool": args.worker, "members": args.members, "model": args.model, "seconds": seconds,
        "baseline_peak": baseline_peak, "baseline_now": baseline_now, "peak": peak,
        "increase": peak - baseline_peak, "member_bytes": common.parameter_bytes(members[0]),
        "result_bytes": common.parameter_bytes(result), "peak_where": sampler.where,
        "same_architecture": args.worker == "concat" or all(
            tuple(p.shape) == tuple(q.shape) for p, q in zip(result.state_dict().values(),
                                                            members[0].state_dict().values())),
    }


def configurations(quick: bool) -> list[tuple[str, int]]:
    """``(tool, members)`` pairs, concatenations first (their sizes are the reference)."""
    if quick:
        return [("concat", 2), ("transplant", 2), ("ot", 2)]
    return [("concat", 2), ("concat", 4), ("concat", 8), ("transplant", 2), ("ot", 2), ("transplant", 4), ("ot", 4),
            ("transplant", 8)]


def _phase(where: list[str]) -> str:
    """The innermost fusion frames at the memory peak, short enough for a table cell."""
    frames = [f.split(":")[-1] for f in where]
    return " > ".join(frames[-3:]) if frames else "(outside fusion)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser("fuse", __doc__.splitlines()[0])
    parser.add_argument("--worker", choices=TOOLS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--members", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="resnet18", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true",
                        help="profile transplantation (cProfile, separate process) even if it is faster than OT")
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)), flush=True)
        return {}

    model = "small_resnet" if args.quick else "resnet18"
    rows: list[dict[str, Any]] = []
    for tool, count in configurations(args.quick):
        measured = common.run_worker([__file__, "--worker", tool, "--members", str(count), "--model", model,
                                      "--threads", str(args.threads), "--seed", str(args.seed)])
        rows.append(measured)
        print(f"[{tool} x{count}] {measured['seconds']:.1f} s, peak {measured['peak'] / common.MB:.0f} MB", flush=True)

    concat_size = {r["members"]: r["result_bytes"] for r in rows if r["tool"] == "concat"}
    for row in rows:
        size = concat_size.get(row["members"])
        row.update(
            concat_mb=size / common.MB if size else None,
            baseline_mb=row["baseline_peak"] / common.MB, peak_mb=row["peak"] / common.MB,
            increase_mb=row["increase"] / common.MB,
            increase_ratio=row["increase"] / size if size else None,
            peak_ratio=row["peak"] / size if size else None,
            phase=_phase(row["peak_where"]),
        )
        row["memory_goal_met"] = row["increase_ratio"] <= GOAL_MEMORY_RATIO if size else None
    columns = {"tool": "tool", "members": "members", "seconds": "time s", "baseline_mb": "baseline RSS MB",
               "peak_mb": "peak RSS MB", "increase_mb": "increase MB", "concat_mb": "concat params MB",
               "increase_ratio": "increase / concat", "peak_ratio": "peak / concat",
               "memory_goal_met": f"increase <= {GOAL_MEMORY_RATIO:g}x concat", "phase": "running at the peak"}
    model_text = "small ResNet (width 8)" if args.quick else "torchvision ResNet-18"
    member_mb = rows[0]["member_bytes"] / common.MB
    sections = [(f"{model_text} members ({member_mb:.1f} MB of parameters each), 32x32 inputs, CPU, "
                 f"{args.threads} thread(s); one fresh process per row", common.markdown_table(rows, columns))]

    speed = []
    for count in sorted({r["members"] for r in rows if r["tool"] == "ot"}):
        ours = next((r for r in rows if r["tool"] == "transplant" and r["members"] == count), None)
        ot = next(r for r in rows if r["tool"] == "ot" and r["members"] == count)
        if ours is not None:
            speed.append({"members": count, "transplant s": ours["seconds"], "OT fusion s": ot["seconds"],
                          "OT s / transplant s": ot["seconds"] / ours["seconds"],
                          "transplant faster": ours["seconds"] < ot["seconds"]})
    sections.append(("Transplantation vs OT fusion (same run)", common.markdown_table(speed)))
    baseline = min(r["baseline_mb"] for r in rows)
    notes = [f"Baseline process RSS (Python + torch + torchvision + fusion + the members, before the call): "
             f"{baseline:.0f} MB to {max(r['baseline_mb'] for r in rows):.0f} MB."]
    transplant = [r for r in rows if r["tool"] == "transplant" and r["increase_ratio"] is not None]
    if transplant:
        met = [r for r in transplant if r["memory_goal_met"]]
        notes.append(f"Memory goal (increase <= {GOAL_MEMORY_RATIO:g}x concatenated parameter bytes) met by "
                     f"transplantation for {len(met)}/{len(transplant)} ensemble sizes; increase / concat = "
                     + ", ".join(f"{r['increase_ratio']:.2f} (N={r['members']})" for r in transplant)
                     + "; absolute peak / concat = "
                     + ", ".join(f"{r['peak_ratio']:.2f} (N={r['members']})" for r in transplant) + ".")
    if speed:
        notes.append("Transplantation faster than OT fusion: "
                     + ", ".join(f"N={s['members']}: {'yes' if s['transplant faster'] else 'no'} "
                                 f"({s['OT s / transplant s']:.2f}x)" for s in speed) + ".")
    profile = None
    slower = [s["members"] for s in speed if not s["transplant faster"]]
    if slower or args.profile:
        count = max(slower or [r["members"] for r in rows if r["tool"] == "transplant"])
        profile = common.run_worker([__file__, "--worker", "transplant", "--members", str(count), "--model", model,
                                     "--threads", str(args.threads), "--seed", str(args.seed), "--profile"])["profile"]
        sections.append((f"Where the time goes: fuse_ensemble of {count} under cProfile (separate process), "
                         f"{profile['total']:.2f} s (phases, cumulative)", common.profile_table(profile, "focus")))
        sections.append(("Top functions by own time", common.profile_table(profile, "by_own_time")))
    results = {"rows": rows, "speed": speed, "goal_memory_ratio": GOAL_MEMORY_RATIO, "model": model,
               "profile": profile}
    common.report(args, "fuse", sections, results, notes)
    return results


if __name__ == "__main__":
    main()
