"""Benchmark: time and peak RSS of ``fusion merge-yaml`` vs ``mergekit-yaml`` on the same YAML, same run.

Inputs: three float32 Hugging Face LLaMA checkpoints (hidden 1024, 8 layers, vocab 32000,
intermediate 3584: ~0.71 GB each): a randomly initialised base and two fine-tunes made by
perturbing half of every weight (``fusion.merging.synthetic``). Configurations: TIES (density 0.5,
sign election, the heaviest common method) and task arithmetic, both with the base and two models.

Memory method: each merge runs as a command in a fresh process; its peak resident set size is the
``ru_maxrss`` that ``os.wait4`` reports for that child. The *baseline* is the same measurement for
the same interpreter only importing what the command imports (``fusion.cli.main`` / mergekit's
``run_yaml``), so "increase" is what merging added. Memory-mapped input pages that were touched
count as resident, for both tools.

Goals (issue 13): fusion's peak RSS <= mergekit's and <= 1.5 GB above its baseline; time <=
mergekit's. Without mergekit (see ``.ci/install_mergekit.sh``) only fusion is measured.

Usage::

    nice -n 10 python benchmarks/bench_merge.py          # three ~0.7 GB checkpoints
    python benchmarks/bench_merge.py --quick              # tiny models, seconds
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib as common  # first: puts the repository on sys.path

GOAL_INCREASE_GB = 1.5
METHODS = {
    "ties": "merge_method: ties\nparameters: {{normalize: true}}\nbase_model: {base}\nmodels:\n"
            "  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            "  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: float32\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       "  - model: {ft1}\n    parameters: {{weight: 0.5}}\n"
                       "  - model: {ft2}\n    parameters: {{weight: 0.5}}\ndtype: float32\n",
}


def run_measured(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    err = child.stderr.read().decode(errors="replace") if child.stderr else ""
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed ({child.returncode}):\n{err[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = common.base_parser("merge", __doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where checkpoints and outputs go (default: a temporary folder)")
    args = parser.parse_args()
    common.set_threads(args.threads)
    sys.path.insert(0, str(common.REPO / "tests"))
    from test_merging_parity import _interpreter, find_mergekit_yaml

    from fusion.merging.synthetic import write_llama_family

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(common.REPO)}
    script = find_mergekit_yaml()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_merge_"))
    size = dict(hidden=64, layers=2, vocab=256, intermediate=128) if args.quick else dict(
        hidden=1024, layers=8, vocab=32000, intermediate=3584)
    models = work / "models"
    if not (models / "ft2" / "config.json").exists():
        write_llama_family(models, 2, seed=args.seed, **size)
    checkpoint_bytes = sum(f.stat().st_size for f in (models / "base").glob("*.safetensors"))
    fusion_cmd = [sys.executable, "-m", "fusion", "merge-yaml"]
    fusion_base = [sys.executable, "-c", "import fusion.cli.main, fusion.merging, safetensors, torch"]
    baselines = {"fusion": run_measured(fusion_base, env)[1]}
    tools = {"fusion": fusion_cmd}
    notes = []
    if script is not None:
        python = _interpreter(script)
        baselines["mergekit"] = run_measured([python, "-c", "import mergekit.scripts.run_yaml, torch"], env)[1]
        tools["mergekit"] = [python, str(script)]
    else:
        notes.append("Peer skipped: mergekit-yaml not found (run .ci/install_mergekit.sh).")
    rows, results = [], {}
    for method, template in METHODS.items():
        config = work / f"{method}.yml"
        config.write_text(template.format(base=models / "base", ft1=models / "ft1", ft2=models / "ft2"))
        for tool, command in tools.items():
            out = work / f"out_{tool}_{method}"
            extra = ["--threads", str(args.threads), "-q"] if tool == "fusion" else [
                "--no-copy-tokenizer", "--quiet", "--random-seed", "0"]
            timings = []
            for _ in range(args.repeat or 1):
                shutil.rmtree(out, ignore_errors=True)
                timings.append(run_measured([*command, str(config), str(out), *extra], env))
            seconds, peak = min(t[0] for t in timings), max(t[1] for t in timings)
            results[f"{tool}/{method}"] = {"seconds": seconds, "peak_rss": peak, "baseline_rss": baselines[tool]}
            rows.append({"method": method, "tool": tool, "time s": seconds, "peak RSS GB": peak / 1e9,
                         "baseline GB": baselines[tool] / 1e9, "increase GB": (peak - baselines[tool]) / 1e9})
        if "mergekit" in tools:
            ours, theirs = results[f"fusion/{method}"], results[f"mergekit/{method}"]
            ratio_t, ratio_m = ours["seconds"] / theirs["seconds"], ours["peak_rss"] / theirs["peak_rss"]
            rows.append({"method": method, "tool": "fusion / mergekit", "time s": ratio_t, "peak RSS GB": ratio_m})
            notes.append(f"{method}: time ratio {ratio_t:.2f} (goal <= 1: {'met' if ratio_t <= 1 else 'MISSED'}), "
                         f"peak RSS ratio {ratio_m:.2f} (goal <= 1: {'met' if ratio_m <= 1 else 'MISSED'}).")
        increase = (results[f"fusion/{method}"]["peak_rss"] - baselines["fusion"]) / 1e9
        notes.append(f"{method}: fusion's increase over its baseline {increase:.2f} GB (goal <= {GOAL_INCREASE_GB}: "
                     f"{'met' if increase <= GOAL_INCREASE_GB else 'MISSED'}).")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    title = f"Merging 3 float32 LLaMA checkpoints of {checkpoint_bytes / 1e9:.2f} GB each"
    common.report(args, "merge", [(title, common.markdown_table(rows))], results, notes)


if __name__ == "__main__":
    main()
