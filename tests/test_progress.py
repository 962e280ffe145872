"""Specification of fusion.progress: bars on terminals only, never per-step redraws in logs."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

import fusion
from fusion import progress
from fusion.models import MLP

LIBRARY = Path(fusion.__file__).parent


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _evaluate_with_progress() -> None:
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(20)]
    fusion.evaluate(MLP(6, (5,), 3), data, progress=True)


def test_no_redraws_when_stderr_is_not_a_terminal(monkeypatch) -> None:
    monkeypatch.delenv(progress.ENVIRONMENT, raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    _evaluate_with_progress()
    assert sys.stderr.getvalue() == ""


def test_a_stage_is_one_log_line_when_not_a_terminal(monkeypatch, caplog) -> None:
    monkeypatch.delenv(progress.ENVIRONMENT, raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="fusion.progress"):
        _evaluate_with_progress()
    assert len(caplog.records) == 1 and "evaluate" in caplog.records[0].getMessage()


def test_bars_are_drawn_on_a_terminal(monkeypatch) -> None:
    monkeypatch.delenv(progress.ENVIRONMENT, raising=False)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert progress.interactive()
    bar = progress.tqdm(range(3), desc="stage", file=terminal)
    list(bar)
    bar.close()
    assert "stage" in terminal.getvalue()


@pytest.mark.parametrize(("setting", "expected"), [("always", True), ("never", False)])
def test_the_environment_overrides_the_detection(monkeypatch, setting, expected) -> None:
    monkeypatch.setenv(progress.ENVIRONMENT, setting)
    monkeypatch.setattr("sys.stderr", Terminal() if not expected else io.StringIO())
    assert progress.interactive() is expected


def test_every_progress_bar_of_the_library_uses_the_shared_helper() -> None:
    direct = [str(path.relative_to(LIBRARY)) for path in LIBRARY.rglob("*.py")
              if path.name != "progress.py" and re.search(r"^\s*(from tqdm|import tqdm)", path.read_text(), re.M)]
    assert direct == []
