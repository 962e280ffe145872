"""Shared helpers of the benchmarks: timing, memory, profiling, markdown tables and JSON reports.

Every benchmark is a script run from the repository root (``python benchmarks/bench_<topic>.py``). It
prints one or more markdown tables followed by the exact command that produced them, and writes the
same numbers as JSON to ``results/bench_<topic>/`` (``quick.json`` or ``full.json``, with the printed
markdown beside it in ``quick.md`` / ``full.md``). Speed is only
ever reported as a ratio against a peer measured in the same run, never asserted.

Importing this module puts the repository root on ``sys.path`` so that ``import fusion`` works
without installing the package.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import gc
import json
import os
import platform
import pstats
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def base_parser(topic: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares.

    ``--quick`` (a small configuration for smoke tests), ``--out`` (JSON folder, default
    ``results/bench_<topic>``), ``--threads`` (torch intra-op threads; 1 by default so that numbers are
    stable on a shared machine), ``--repeat`` (timed runs per measurement; the minimum is reported)
    and ``--seed``.
    """
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="small configuration (smoke test, seconds)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / f"bench_{topic}",
                        help=f"folder of the JSON report (default: results/bench_{topic})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (minimum reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of models and inputs")
    return parser


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = [f"OMP_NUM_THREADS={threads}"] if threads else []
    return " ".join(prefix + ["python", shlex.quote(script_text)] + [shlex.quote(a) for a in argv[1:]])


def set_threads(threads: int) -> None:
    """Use ``threads`` torch intra-op threads."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every report."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    for name in ("torchvision", "torch_pruning", "scipy", "rebasin"):
        module = optional_import(name)
        info[name] = getattr(module, "__version__", "installed") if module is not None else None
    info["git_commit"], info["git_dirty_files"] = _git_state()
    if info["rebasin"] == "installed":
        from importlib.metadata import version

        info["rebasin"] = version("rebasin")
    return info


def _git_state() -> tuple[str | None, list[str]]:
    """The checked-out commit and the modified tracked files of fusion/ (the code measured)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fusion"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None, []
    return commit, [line[3:] for line in dirty]


def optional_import(name: str) -> Any:
    """The module ``name``, or None if it cannot be imported (a peer that is not installed)."""
    import importlib

    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken install that fails on import
        return None


# --------------------------------------------------------------------------------------------
# Timing and profiling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs of one call."""

    runs: tuple[float, ...]

    @property
    def best(self) -> float:
        """The fastest run (least disturbed by other processes)."""
        return min(self.runs)


def time_call(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, Timing]:
    """Run ``fn`` ``repeat`` times; return its last result and the wall-clock time of every run."""
    runs = []
    result = None
    for _ in range(max(1, repeat)):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - start)
    return result, Timing(tuple(runs))


def profile_call(fn: Callable[[], Any], top: int = 10, focus: Iterable[str] = ()) -> dict[str, Any]:
    """Profile one call of ``fn`` with cProfile.

    Args:
        fn: the call to profile.
        top: how many functions to list by own (``tottime``) and by cumulative time.
        focus: functions whose cumulative time is reported as a breakdown, whatever their rank: a name
            (``"deepcopy"``) or ``"path fragment:name"`` (``"fusion/spec.py:__init__"``) to tell apart
            functions of the same name.

    Returns:
        ``{"total": seconds, "by_own_time": [...], "by_cumulative": [...], "focus": [...]}`` where
        each entry has ``function`` (``file:line(name)``), ``calls``, ``own_s`` and ``cumulative_s``.
    """
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(fn)
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    entries = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        entries.append({"function": f"{_short_path(filename)}:{line}({name})", "name": name, "calls": calls,
                        "own_s": own, "cumulative_s": cumulative})
    by_focus: dict[str, dict[str, Any]] = {}
    for pattern in focus:  # a pattern may match several functions: keep the most expensive
        where, _, name = pattern.rpartition(":")
        matches = [e for e in entries if e["name"] == name and where in e["function"]]
        if matches:
            by_focus[pattern] = max(matches, key=lambda e: e["cumulative_s"])
    return {
        "total": total,
        "by_own_time": sorted(entries, key=lambda e: -e["own_s"])[:top],
        "by_cumulative": sorted(entries, key=lambda e: -e["cumulative_s"])[:top],
        "focus": sorted(by_focus.values(), key=lambda e: -e["cumulative_s"]),
    }


def _short_path(filename: str) -> str:
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def profile_table(profile: Mapping[str, Any], key: str) -> str:
    """A markdown table of one list of :func:`profile_call`'s result (``"by_own_time"``, ``"focus"``...)."""
    total = profile["total"]
    rows = [{"function": e["function"], "calls": e["calls"], "own s": e["own_s"], "cumulative s": e["cumulative_s"],
             "% of total": 100 * e["cumulative_s"] / total if total else 0.0} for e in profile[key]]
    return markdown_table(rows)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident set size (``getrusage``; never decreases)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def current_rss_bytes() -> int:
    """The resident set size of this process now (Linux ``/proc``; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def parameter_bytes(model: Any) -> int:
    """Bytes of a model's parameters (buffers not counted)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class PeakSampler:
    """Samples this process's RSS in a background thread and remembers where the main thread was at the peak.

    ``getrusage`` gives the true high-water mark but not the moment; this sampler (every ``interval``
    seconds) finds the phase: the chain of frames of ``packages`` in the main thread's stack when the
    largest RSS was seen. Use as a context manager around the measured call.

    Attributes:
        peak: the largest sampled RSS in bytes.
        where: the frames (``file:function``, outermost first) of ``packages`` at that moment.
    """

    def __init__(self, interval: float = 0.005, packages: Sequence[str] = ("fusion/", "torch_pruning/")):
        self.interval, self.packages = interval, tuple(packages)
        self.peak, self.where = 0, []
        self._stop = threading.Event()
        self._main = threading.get_ident()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _frames(self) -> list[str]:
        frame = sys._current_frames().get(self._main)
        chain = []
        while frame is not None:
            filename = frame.f_code.co_filename
            if any(p in filename for p in self.packages):
                chain.append(f"{_short_path(filename)}:{frame.f_code.co_name}")
            frame = frame.f_back
        return chain[::-1]

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = current_rss_bytes()
            if rss > self.peak:
                self.peak, self.where = rss, self._frames()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_worker(argv: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run a benchmark script in a fresh Python process and return the JSON object it prints last.

    A fresh process gives each measurement its own ``getrusage`` high-water mark. The worker must
    print one JSON object as its last line of standard output.

    Raises:
        RuntimeError: the worker failed or printed no JSON (its standard error is included).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=str(REPO))
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"worker {' '.join(argv)} failed (exit code {done.returncode}):\n{tail}")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# Tables and reports
# --------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """Compact text for a table cell: floats with 3-4 significant digits, None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1e5 or magnitude < 1e-3:
            return f"{value:.3g}" if magnitude >= 1e5 else f"{value:.2e}"
        if magnitude >= 100:
            return f"{value:.1f}"
        return f"{value:.3g}" if magnitude < 1 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | Mapping[str, str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (one dict per row).

    ``columns``: the keys to show (default: the first row's keys), or a mapping key -> header text.
    """
    if not rows:
        return "(no rows)"
    columns = columns if columns is not None else list(rows[0].keys())
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    lines = ["| " + " | ".join(headers.values()) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(key)) for key in headers) + " |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (fusion's own writer: temporary file + ``os.replace``)."""
    from fusion.analysis.io import write_text as atomic_write_text

    return atomic_write_text(path, text)


def write_json(folder: Path, name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``folder/name.json`` atomically."""
    return write_text(Path(folder) / f"{name}.json", json.dumps(_jsonable(payload), indent=2) + "\n")


def report(args: argparse.Namespace, topic: str, sections: Sequence[tuple[str, str]], results: Mapping[str, Any],
           notes: Sequence[str] = ()) -> Path:
    """Print the tables, notes and the reproducing command, and write the JSON report.

    Args:
        args: the parsed command line (recorded in the JSON).
        topic: the benchmark's topic (``"spec"``, ``"align"``, ``"fuse"``).
        sections: ``(title, markdown)`` pairs, printed in order.
        results: the measured numbers (JSON-serialisable, dataclasses allowed).
        notes: sentences printed after the tables (goals met or missed, skipped peers...).

    Returns:
        The path of the JSON file.
    """
    command = command_line()
    text = []
    for title, body in sections:
        text += [f"### {title}", "", body, ""]
    text += [f"- {note}" for note in notes]
    if notes:
        text.append("")
    text += ["Reproduce with:", "", "```", command, "```"]
    markdown = "\n".join(text)
    print(markdown, flush=True)
    name = "quick" if args.quick else "full"
    payload = {"topic": topic, "command": command, "arguments": vars(args), "environment": environment(),
               "results": results, "notes": list(notes), "markdown": markdown}
    path = write_json(args.out, name, payload)
    write_text(Path(args.out) / f"{name}.md", markdown + "\n")
    print(f"\nJSON written to {path}", flush=True)
    return path
