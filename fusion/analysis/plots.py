"""Figures of the analysis results: interpolation curves, layer-distance heatmaps and animations.

Everything is drawn on matplotlib :class:`~matplotlib.figure.Figure` objects with the Agg canvas
(no pyplot, no display, no global backend change) and written atomically (see
:func:`fusion.analysis.io.atomic_path`). The animated GIF uses matplotlib's Pillow writer and
has one frame per evaluated point of the curve.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.animation import FuncAnimation, PillowWriter
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..errors import DataError
from .curves import CurveEvaluation, load_curve_evaluation
from .distances import check_metric
from .interpolation import InterpolationCurve
from .io import PathLike, atomic_path

__all__ = ["animate_layer_distances", "plot_distance_heatmap", "plot_interpolation"]

logger = logging.getLogger(__name__)

METRIC_LABELS = {
    "raw_l2": "raw L2 distance\n" r"$\|W_t - W_{ref}\|$",
    "normalized_l2": "normalized L2 distance\n" r"$\|W_t - W_{ref}\| \;/\; \sqrt{n}$",
    "relative": "relative distance\n" r"$\|W_t - W_{ref}\| \;/\; \|W_{ref}\|$",
}
_BASE_COLOR = "tab:blue"
_HIGHLIGHT_COLOR = "tab:red"
_INFINITE_COLOR = "lightgray"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure: Figure, path: PathLike, dpi: int) -> Path:
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=fmt, dpi=dpi)
    return Path(path)


def _distances(
    evaluation_or_npz: CurveEvaluation | PathLike, metric: str, highlight: str | Sequence[str] | None
) -> tuple[CurveEvaluation, np.ndarray, list[bool]]:
    """The evaluation, its (T, L) matrix of ``metric`` and which layers to highlight."""
    check_metric(metric)
    evaluation = (
        evaluation_or_npz if isinstance(evaluation_or_npz, CurveEvaluation) else load_curve_evaluation(evaluation_or_npz)
    )
    return evaluation, evaluation.metric(metric), _highlighted(evaluation.names, highlight)


def _highlighted(names: Sequence[str], highlight: str | Sequence[str] | None) -> list[bool]:
    """Which rows match ``highlight`` (a name, or a module prefix such as ``"features.3"``)."""
    if highlight is None:
        return [False] * len(names)
    wanted = [highlight] if isinstance(highlight, str) else list(highlight)
    flags = [any(n == h or n.startswith(h + ".") for h in wanted) for n in names]
    for h in wanted:
        if not any(n == h or n.startswith(h + ".") for n in names):
            raise DataError(f"highlight: {h!r} names no layer of the evaluation; known: {list(names)}")
    return flags


def _finite_max(matrix: np.ndarray) -> float:
    finite = matrix[np.isfinite(matrix)]
    top = float(finite.max()) if finite.size else 0.0
    return top if top > 0 else 1.0


def _x_values(curve: InterpolationCurve | CurveEvaluation) -> np.ndarray:
    return curve.alphas if isinstance(curve, InterpolationCurve) else curve.t


def plot_interpolation(
    curves: Mapping[str, InterpolationCurve | CurveEvaluation],
    path: PathLike,
    metric: str = "loss",
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Draw several loss (or accuracy) curves on one figure, e.g. naive vs aligned vs Bézier.

    Args:
        curves: label -> curve (:class:`InterpolationCurve` over alpha, or :class:`CurveEvaluation` over t).
        path: output image (``.png``, ``.pdf``, ``.svg``; format from the suffix).
        metric: ``"loss"`` or ``"accuracy"``.
        title: figure title (default names the metric).
        dpi: resolution of raster output.

    Returns:
        The path written.
    """
    if metric not in ("loss", "accuracy"):
        raise DataError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    if not curves:
        raise DataError("curves is empty: pass at least one label -> curve")
    figure = _new_figure(7.0, 4.5)
    ax = figure.add_subplot()
    for label, curve in curves.items():
        if not isinstance(curve, (InterpolationCurve, CurveEvaluation)):
            raise DataError(f"curves[{label!r}] is a {type(curve).__name__}, not an InterpolationCurve/CurveEvaluation")
        values = getattr(curve, metric)
        size = curve.barrier if metric == "loss" else curve.accuracy_barrier
        scale = 100.0 if metric == "accuracy" else 1.0
        ax.plot(_x_values(curve), values * scale, marker="o", markersize=3, label=f"{label} (barrier {size * scale:.3g})")
    ax.set_xlabel("position on the path (alpha or t): 0 = model A, 1 = model B")
    ax.set_ylabel("loss" if metric == "loss" else "accuracy (%)")
    ax.set_title(title or f"{metric.capitalize()} along the path between two models")
    ax.set_xlim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    figure.tight_layout()
    return _save_figure(figure, path, dpi)


def plot_distance_heatmap(
    evaluation_or_npz: CurveEvaluation | PathLike,
    path: PathLike,
    metric: str = "normalized_l2",
    highlight: str | Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Heatmap of per-layer distances from the reference (rows: layers, columns: t along the curve).

    Args:
        evaluation_or_npz: a :class:`CurveEvaluation` or the ``.npz`` it was saved to.
        path: output image.
        metric: ``"normalized_l2"``, ``"relative"`` or ``"raw_l2"``.
        highlight: layer name(s) whose label is drawn in red and bold (e.g. the swapped layer).
        title: figure title.
        dpi: resolution of raster output.

    Returns:
        The path written.
    """
    evaluation, matrix, flags = _distances(evaluation_or_npz, metric, highlight)
    matrix = matrix.T  # (L, T)
    num_layers = len(evaluation.names)
    figure = _new_figure(8.0, min(max(3.0, 0.25 * num_layers + 1.8), 40.0))
    ax = figure.add_subplot()
    infinite = bool(np.isinf(matrix).any())
    image = ax.imshow(
        np.ma.masked_invalid(matrix),
        aspect="auto",
        origin="upper",
        cmap=colormaps["viridis"].with_extremes(bad=_INFINITE_COLOR),
        vmin=0.0,
        vmax=_finite_max(matrix),
        interpolation="nearest",
        extent=(float(evaluation.t[0]), float(evaluation.t[-1]), num_layers - 0.5, -0.5),
    )
    ax.set_yticks(range(num_layers))
    ax.set_yticklabels(evaluation.names, fontsize=8 if num_layers <= 40 else 6)
    for label, flag in zip(ax.get_yticklabels(), flags):
        if flag:
            label.set_color(_HIGHLIGHT_COLOR)
            label.set_fontweight("bold")
    if infinite:
        ax.legend(handles=[Patch(color=_INFINITE_COLOR, label="infinite (zero reference)")], loc="lower right")
    ax.set_xlabel("t along the curve (0 = reference start, 1 = end)")
    ax.set_ylabel("layer")
    ax.set_title(title or f"Per-layer distance from the reference: {metric}")
    colorbar = figure.colorbar(image, ax=ax)
    colorbar.set_label(METRIC_LABELS[metric])
    figure.tight_layout()
    return _save_figure(figure, path, dpi)


def animate_layer_distances(
    evaluation_or_npz: CurveEvaluation | PathLike,
    path: PathLike,
    fps: int = 10,
    metric: str = "normalized_l2",
    highlight: str | Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 80,
) -> Path:
    """Animated GIF of the per-layer distance bar chart as t moves along the curve (one frame per point).

    Args:
        evaluation_or_npz: a :class:`CurveEvaluation` or the ``.npz`` it was saved to.
        path: output ``.gif``.
        fps: frames per second.
        metric: ``"normalized_l2"``, ``"relative"`` or ``"raw_l2"``.
        highlight: layer name(s) drawn in red (e.g. the layer whose neurons were swapped).
        title: first line of each frame's title.
        dpi: resolution.

    Returns:
        The path written.
    """
    evaluation, matrix, flags = _distances(evaluation_or_npz, metric, highlight)  # matrix: (T, L)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise DataError(f"fps must be a positive number, got {fps!r}")
    num_layers = len(evaluation.names)
    top = _finite_max(matrix) * 1.1
    shown = np.where(np.isfinite(matrix), matrix, top)  # an infinite relative distance fills its bar

    figure = _new_figure(min(max(6.0, 0.35 * num_layers + 2.0), 30.0), 5.0)
    ax = figure.add_subplot()
    colors = [_HIGHLIGHT_COLOR if flag else _BASE_COLOR for flag in flags]
    bars = ax.bar(range(num_layers), shown[0], color=colors)
    ax.set_ylim(0.0, top)
    ax.set_xticks(range(num_layers))
    ax.set_xticklabels(evaluation.names, rotation=90 if num_layers > 6 else 0, fontsize=8 if num_layers <= 40 else 6)
    ax.set_xlabel("layer")
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.grid(True, axis="y", alpha=0.3)
    if any(flags):
        ax.legend(
            handles=[Patch(color=_HIGHLIGHT_COLOR, label="highlighted layer"), Patch(color=_BASE_COLOR, label="other layers")],
            loc="upper left",
        )
    heading = title or f"Per-layer distance from the reference ({metric})"
    digits = max(3, math.ceil(math.log10(max(evaluation.t.size - 1, 1))) + 1)

    def draw(frame: int) -> list:
        for bar, height in zip(bars, shown[frame]):
            bar.set_height(height)
        ax.set_title(
            f"{heading}\nt = {evaluation.t[frame]:.{digits}f}   loss {evaluation.loss[frame]:.4f}   "
            f"accuracy {evaluation.accuracy[frame]:.2%}"
        )
        return list(bars)

    draw(0)
    figure.tight_layout()
    animation = FuncAnimation(figure, draw, frames=evaluation.t.size, blit=False, repeat=False)
    with atomic_path(path) as tmp:
        animation.save(tmp, writer=PillowWriter(fps=fps), dpi=dpi)
    logger.debug("wrote %d frames to %s", evaluation.t.size, path)
    return Path(path)
