"""Specification of fusion.analysis.io: atomic writes that leave files as a plain open() would."""

from __future__ import annotations

import os
import stat

import pytest

from fusion.analysis.io import save_json, save_npz, write_text
from fusion.checkpoint import save_model
from fusion.models import MLP


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("writer", ["json", "npz", "text", "checkpoint"])
def test_new_files_get_the_umask_permissions_of_a_plain_open(tmp_path, umask_022, writer) -> None:
    path = tmp_path / f"out.{writer}"
    {"json": lambda: save_json({"a": 1}, path), "npz": lambda: save_npz(path, {"a": [1, 2]}),
     "text": lambda: write_text(path, "x"), "checkpoint": lambda: save_model(MLP(4, (3,), 2), path)}[writer]()
    with open(tmp_path / "plain", "w") as handle:
        handle.write("x")
    assert _mode(path) == _mode(tmp_path / "plain") == 0o644


def test_a_stricter_umask_is_respected(tmp_path) -> None:
    previous = os.umask(0o077)
    try:
        path = save_json({}, tmp_path / "private.json")
    finally:
        os.umask(previous)
    assert _mode(path) == 0o600


def test_replacing_a_file_keeps_its_permissions(tmp_path, umask_022) -> None:
    path = tmp_path / "shared.json"
    path.write_text("{}")
    path.chmod(0o664)
    save_json({"b": 2}, path)
    assert _mode(path) == 0o664
