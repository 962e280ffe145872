"""Refresh the tables of benchmarks/README.md from the last full runs (results/bench_<topic>/full.json).

Each section of the README that starts with ``## ... (`bench_<topic>.py`)`` keeps its prose up to
its ``_Last run`` line; that line and everything after it, up to the next ``## `` heading, are
replaced by a new ``_Last run`` line (date, commit, environment) and the script's own markdown
output, so the tables are never typed by hand.

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import benchlib

README = Path(__file__).with_name("README.md")
SECTION = re.compile(r"^## .*\(`bench_(\w+)\.py`\)\s*$")


def last_run_line(report: dict) -> str:
    env = report["environment"]
    dirty = env.get("git_dirty_files") or []
    dirty_note = f" (uncommitted files under fusion/: {', '.join(dirty)})" if dirty else ""
    peer = f", rebasin {env['rebasin']}" if env.get("rebasin") else ""
    return (f"_Last run {env['date']} on commit `{env['git_commit'][:7]}`{dirty_note}, {env['cpu_count']} CPU cores, "
            f"torch {env['torch']}, torch-pruning {env['torch_pruning']}{peer}. Output of "
            f"`{report['command']}` (also in results/bench_{report['topic']}/full.md)._")


def refresh(text: str, results: Path) -> str:
    lines, out, topic = text.splitlines(), [], None
    skipping = False
    for line in lines:
        match = SECTION.match(line)
        if match or (line.startswith("## ") and skipping):
            skipping = False
        if match:
            topic = match.group(1)
        if skipping:
            continue
        if line.startswith("_Last run") and topic and (results / f"bench_{topic}" / "full.json").exists():
            report = json.loads((results / f"bench_{topic}" / "full.json").read_text())
            body = report["markdown"].replace("\n### ", "\n#### ")
            body = "#### " + body[4:] if body.startswith("### ") else body
            out += [last_run_line(report), "", body, ""]
            skipping = True
            continue
        out.append(line)
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    results = benchlib.REPO / "results"
    new = refresh(README.read_text(), results)
    benchlib.write_text(README, new)
    print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
