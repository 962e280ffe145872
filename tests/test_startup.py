"""Start-up of ``fusion``: what ``fusion --help`` and ``fusion spec`` import (heavy dependencies load lazily).

Measured with ``python -X importtime``; here the imports themselves are specified, not their time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("timm", "transformers", "torchvision", "ot", "sklearn", "matplotlib", "torch._dynamo")


def _modules_after(code: str) -> set[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_help_imports_neither_torch_nor_numpy() -> None:
    loaded = _modules_after("import contextlib, io\nfrom fusion.cli import main\n"
                            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
                            "    main(['--help'])")
    assert not {"torch", "numpy", *HEAVY} & loaded


def test_import_fusion_loads_public_names_on_first_use() -> None:
    loaded = _modules_after("import fusion\nassert 'permute' in dir(fusion)")
    assert "torch" not in loaded


def test_the_spec_command_path_skips_timm_and_the_other_heavy_packages() -> None:
    loaded = _modules_after("import fusion\nfusion.swap_neurons\n"
                            "import fusion.cli.commands_model, fusion.coverage, fusion.spec, fusion.checkpoint")
    assert {"torch", "torch_pruning"} <= loaded
    assert not set(HEAVY) & loaded


@pytest.mark.slow
def test_timm_stays_importable_after_torch_pruning() -> None:
    pytest.importorskip("timm")
    loaded = _modules_after("from fusion._lazy import tp\nimport timm\nassert timm.create_model")
    assert "timm" in loaded


@pytest.mark.slow
def test_submodules_named_like_functions_keep_the_functions() -> None:
    _modules_after("import fusion, fusion.permute, fusion.evaluate, fusion.align\n"
                   "assert callable(fusion.permute) and callable(fusion.evaluate) and callable(fusion.align)")
