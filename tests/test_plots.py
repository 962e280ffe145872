"""Specification of fusion.analysis.plots: interpolation figures, distance heatmaps and GIF animations."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fusion.analysis.curves import CurveEvaluation
from fusion.analysis.interpolation import InterpolationCurve
from fusion.analysis.plots import animate_layer_distances, plot_distance_heatmap, plot_interpolation
from fusion.errors import DataError

NAMES = ("features.0", "features.3", "features.6", "classifier")


def _evaluation(num_points: int = 7) -> CurveEvaluation:
    """A synthetic curve: layer ``features.3`` moves most; ``classifier`` starts at zero (relative inf)."""
    t = np.linspace(0.0, 1.0, num_points)
    bump = np.sin(np.pi * t)[:, None]  # (T, 1)
    raw = bump * np.array([[0.1, 2.0, 0.3, 0.5]]) + t[:, None] * np.array([[0.0, 1.0, 0.0, 0.0]])
    counts = np.array([100, 400, 400, 50])
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = raw / np.array([1.0, 4.0, 2.0, 0.0])  # the last column is inf (nan at t = 0)
    arrays = {
        "t": t,
        "loss": 0.3 + bump[:, 0],
        "accuracy": 0.95 - 0.2 * bump[:, 0],
        "layer_names": np.asarray(NAMES),
        "raw_l2": raw,
        "normalized_l2": raw / np.sqrt(counts),
        "relative": np.nan_to_num(relative, nan=0.0, posinf=np.inf),
        "num_params": counts,
    }
    return CurveEvaluation.from_arrays(arrays)


def _curve(height: float) -> InterpolationCurve:
    alphas = np.linspace(0.0, 1.0, 11)
    bump = height * np.sin(np.pi * alphas)
    return InterpolationCurve.from_values(alphas, 0.2 + bump, 0.9 - 0.3 * bump)


def _assert_image(path, fmt: str) -> Image.Image:
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
    image = Image.open(path)
    assert image.format == fmt
    assert image.size[0] > 200 and image.size[1] > 150
    return image


def _only_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_plot_interpolation_writes_a_png_with_several_curves(tmp_path, metric) -> None:
    path = tmp_path / f"interp_{metric}.png"
    curves = {"naive": _curve(1.0), "weight matching": _curve(0.2), "bezier": _evaluation()}
    assert plot_interpolation(curves, path, metric=metric) == path
    _assert_image(path, "PNG")
    assert _only_files(tmp_path) == [path.name]


def test_plot_interpolation_rejects_unknown_metric_and_empty_input(tmp_path) -> None:
    with pytest.raises(DataError, match="metric"):
        plot_interpolation({"a": _curve(1.0)}, tmp_path / "x.png", metric="barrier")
    with pytest.raises(DataError, match="empty"):
        plot_interpolation({}, tmp_path / "x.png")
    with pytest.raises(DataError, match="not an InterpolationCurve"):
        plot_interpolation({"a": [1, 2, 3]}, tmp_path / "x.png")
    assert _only_files(tmp_path) == []


@pytest.mark.parametrize("metric", ["normalized_l2", "relative", "raw_l2"])
def test_heatmap_writes_a_png_for_each_metric(tmp_path, metric) -> None:
    path = tmp_path / f"heatmap_{metric}.png"
    plot_distance_heatmap(_evaluation(), path, metric=metric, highlight="features.3")
    _assert_image(path, "PNG")


def test_heatmap_reads_a_saved_npz_without_changing_it(tmp_path) -> None:
    npz_path, _ = _evaluation().save(tmp_path / "curve.npz")
    before = npz_path.read_bytes()
    path = plot_distance_heatmap(npz_path, tmp_path / "heatmap.png")
    _assert_image(path, "PNG")
    assert npz_path.read_bytes() == before


def test_unknown_highlight_raises_and_leaves_the_old_file(tmp_path) -> None:
    path = tmp_path / "heatmap.png"
    path.write_bytes(b"old")
    with pytest.raises(DataError, match="features.9"):
        plot_distance_heatmap(_evaluation(), path, highlight="features.9")
    assert path.read_bytes() == b"old"


def test_unknown_distance_metric_raises(tmp_path) -> None:
    with pytest.raises(DataError, match="unknown distance metric"):
        plot_distance_heatmap(_evaluation(), tmp_path / "h.png", metric="cosine")


@pytest.mark.parametrize("num_points", [2, 9])
def test_gif_has_one_frame_per_point(tmp_path, num_points) -> None:
    path = tmp_path / "evolution.gif"
    animate_layer_distances(_evaluation(num_points), path, fps=5, highlight="features.3")
    image = _assert_image(path, "GIF")
    assert image.n_frames == num_points
    assert _only_files(tmp_path) == ["evolution.gif"]


def test_gif_from_npz_with_relative_metric_and_infinite_values(tmp_path) -> None:
    npz_path, _ = _evaluation(4).save(tmp_path / "curve.npz")
    assert np.isinf(np.load(npz_path)["relative"]).any()
    path = animate_layer_distances(npz_path, tmp_path / "relative.gif", metric="relative")
    assert _assert_image(path, "GIF").n_frames == 4


def test_gif_rejects_bad_fps(tmp_path) -> None:
    with pytest.raises(DataError, match="fps"):
        animate_layer_distances(_evaluation(), tmp_path / "x.gif", fps=0)
