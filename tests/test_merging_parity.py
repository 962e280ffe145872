"""``fusion merge-yaml`` gives mergekit-yaml's tensors on the same YAML (float32, max abs diff <= 1e-6).

mergekit is found through ``FUSION_MERGEKIT_YAML``, then ``PATH``, then the virtualenv that
``.ci/install_mergekit.sh`` creates (``~/.cache/fusion/mergekit-venv``); without it these tests skip. All
configs run in one mergekit process (the interpreter of the ``mergekit-yaml`` script), which saves
its ~10 s start-up per method.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusion.merging import merge_yaml
from fusion.merging.synthetic import write_llama_family

pytestmark = pytest.mark.slow

DEFAULT_VENV = Path(os.environ.get("MERGEKIT_VENV", "~/.cache/fusion/mergekit-venv")).expanduser()
TOL = 1e-6


def find_mergekit_yaml() -> Path | None:
    """The ``mergekit-yaml`` executable: ``$FUSION_MERGEKIT_YAML``, then PATH, then the CI venv."""
    for candidate in (os.environ.get("FUSION_MERGEKIT_YAML"), shutil.which("mergekit-yaml"),
                      DEFAULT_VENV / "bin" / "mergekit-yaml"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _interpreter(script: Path) -> str:
    first = script.read_text(errors="replace").splitlines()[0]
    return first[2:].strip() if first.startswith("#!") else sys.executable


_DRIVER = """
import runpy, sys
script, *jobs = sys.argv[1:]
for job in jobs:
    config, out = job.split("::")
    sys.argv = [script, config, out, "--random-seed", "0", "--no-copy-tokenizer", "--quiet"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
"""


def _configs(family: list[Path]) -> dict[str, str]:
    base, ft1, ft2, ft3 = (str(p) for p in family)
    two = (f"base_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6, density: 0.5, gamma: 0.05}}\n"
           f"  - model: {ft2}\n    parameters:\n      weight: [{{filter: self_attn, value: 0.3}}, {{value: [0.2, 0.9]}}]\n"
           f"      density: 0.7\ndtype: float32\n")
    three = f"base_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n  - model: {ft3}\ndtype: float32\n"
    return {
        "linear": (f"merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6}}\n"
                   f"  - model: {ft2}\n    parameters: {{weight: [0.1, 0.8]}}\n"
                   f"  - model: {base}\n    parameters: {{weight: 0.3}}\ndtype: float32\n"),
        "slerp": (f"merge_method: slerp\nbase_model: {ft1}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters:\n  t:\n"
                  "    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                  "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n"
                  "    - value: 0.5\ndtype: float32\n"),
        "task_arithmetic": ("merge_method: task_arithmetic\nparameters: {lambda: 0.8}\n"
                            + two.replace("density: 0.5, gamma: 0.05", "density: 1")),
        "ties": "merge_method: ties\n" + two.replace(", gamma: 0.05", ""),
        "dare_linear": "merge_method: dare_linear\n" + two.replace(", gamma: 0.05", ""),
        "dare_ties": "merge_method: dare_ties\n" + two.replace(", gamma: 0.05", ""),
        "breadcrumbs": "merge_method: breadcrumbs\n" + two,
        "breadcrumbs_ties": "merge_method: breadcrumbs_ties\n" + two,
        "ties_three_global": "merge_method: ties\nparameters: {weight: 0.4, density: 0.6}\n" + three,
        "model_stock": "merge_method: model_stock\n" + three,
        "model_stock_filter_wise": "merge_method: model_stock\nparameters: {filter_wise: true}\n" + three,
        "passthrough_slices": (f"merge_method: passthrough\nslices:\n"
                               f"  - sources:\n      - model: {ft1}\n        layer_range: [0, 2]\n"
                               f"  - sources:\n      - model: {ft3}\n        layer_range: [1, 3]\ndtype: float32\n"),
    }


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    script = find_mergekit_yaml()
    if script is None:
        pytest.skip("mergekit-yaml not found (set FUSION_MERGEKIT_YAML, put it on PATH, or run .ci/install_mergekit.sh)")
    root = tmp_path_factory.mktemp("parity")
    family = write_llama_family(root / "models", 3, hidden=64, layers=3, vocab=96)
    configs = _configs(family)
    jobs = []
    for name, text in configs.items():
        (root / f"{name}.yml").write_text(text)
        jobs.append(f"{root / f'{name}.yml'}::{root / f'mk_{name}'}")
    run = subprocess.run([_interpreter(script), "-c", _DRIVER, str(script), *jobs], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if run.returncode != 0:
        pytest.fail(f"mergekit-yaml failed:\n{run.stderr[-3000:]}")
    return root, configs


@pytest.mark.parametrize("name", list(_configs([Path("p")] * 4)))
def test_merge_yaml_equals_mergekit(merged, name):
    root, _ = merged
    ours = _tensors(merge_yaml(root / f"{name}.yml", root / f"fu_{name}", seed=0))
    theirs = _tensors(root / f"mk_{name}")
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= TOL, f"{name}: max abs difference {worst:.3g}"
    assert all(ours[k].dtype == theirs[k].dtype == torch.float32 for k in ours)
