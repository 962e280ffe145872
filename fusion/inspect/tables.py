"""Plain-text tables for :class:`~fusion.inspect.bend.Inspector` (weights, activations) and their cell values."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..analysis.io import write_text
from ..checks import describe_shapes

__all__ = ["format_table", "render_meta", "short_list", "tensor_meta", "write_or_print"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns with a dashed rule under the header."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def tensor_meta(value: Any) -> tuple[tuple[int, ...], torch.dtype] | str:
    """``(shape, dtype)`` of a tensor, or a shape description of anything else."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    return describe_shapes(value)


def render_meta(meta: tuple[tuple[int, ...], torch.dtype] | str | None) -> str:
    """A table cell for :func:`tensor_meta` output (``"not run"`` for None)."""
    if meta is None:
        return "not run"
    if isinstance(meta, str):
        return meta
    return f"{meta[0]} {str(meta[1]).replace('torch.', '')}"


def write_or_print(table: str, out: str | os.PathLike | None) -> str:
    """Print ``table`` (stdout is where a user asking to *print* a table looks), or write it to ``out``."""
    if out is None:
        print(table)
    else:
        write_text(out, table + "\n")
    return table


def short_list(names: Sequence[str], limit: int = 8) -> str:
    """``"a, b, c"``, cut after ``limit`` names with the total count."""
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
