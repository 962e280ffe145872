"""Bezier mode-connecting curves and plots of saved results: curve, plot."""


from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..analysis.io import load_json, load_npz
from ..checkpoint import (
    save_model,
)
from ..errors import DataError
from .options import CURVE_SUMMARY
from .session import _echo, _Session, _wrote


def _plot_curve_evaluation(evaluation: Any, folder: Path, stem: str, metric: str, fps: int,
                           highlight: Sequence[str] | None, kinds: Sequence[str]) -> list[Path]:
    from ..analysis.plots import animate_layer_distances, plot_distance_heatmap

    written = []
    if "heatmap" in kinds:
        written.append(plot_distance_heatmap(evaluation, folder / f"{stem}_heatmap.png", metric=metric,
                                             highlight=highlight or None))
    if "gif" in kinds:
        written.append(animate_layer_distances(evaluation, folder / f"{stem}.gif", fps=fps, metric=metric,
                                               highlight=highlight or None))
    return written


def _cmd_curve(args: argparse.Namespace) -> int:
    from ..analysis.curves import evaluate_curve, train_bezier_curve
    from ..analysis.interpolation import has_batch_norm, interpolation_curve
    from ..analysis.plots import plot_interpolation

    session = _Session(args)
    model_a, model_b = session.models(args.models, 2, 2)
    train, test = session.loaders
    metadata: dict[str, Any] = {"model_a": str(args.models[0]), "model_b": str(args.models[1]),
                                "epochs": args.epochs, "num_bends": args.num_bends, "lr": args.lr}
    highlight = list(args.highlight or [])
    if args.swap_metadata is not None:
        swap = load_json(args.swap_metadata)
        if not isinstance(swap, dict) or "layer" not in swap:
            raise DataError(f"{str(args.swap_metadata)!r} is not a swap metadata file (it names no 'layer')")
        metadata["swap"] = swap
        highlight.append(swap["layer"])
    curve = train_bezier_curve(model_a, model_b, train, epochs=args.epochs, num_bends=args.num_bends, lr=args.lr,
                               seed=args.seed, progress=session.progress)
    evaluation = evaluate_curve(curve, test, num_points=args.num_points, bn_data=train, progress=session.progress)
    line = interpolation_curve(model_a, model_b, test, steps=args.num_points, reset_bn=has_batch_norm(model_a),
                               bn_data=train, progress=session.progress)
    folder = session.output_dir("results/curve")
    written = [save_model(curve, folder / "curve.pt")]
    written += evaluation.save(folder / "layer_distances_along_curve.npz", folder / CURVE_SUMMARY, metadata=metadata)
    line.save(folder / "straight_line.npz")
    written.append(folder / "straight_line.npz")
    written += _plot_curve_evaluation(evaluation, folder, "layer_distances_evolution", args.metric, args.fps,
                                      highlight, ("heatmap", "gif"))
    written.append(plot_interpolation({"straight line": line, "Bezier curve": evaluation}, folder / "curve_loss.png"))
    _echo(f"Bezier curve ({args.num_bends} bends, {args.epochs} epochs): loss barrier {evaluation.barrier:.4f} "
          f"(straight line {line.barrier:.4f}), accuracy barrier {100 * evaluation.accuracy_barrier:.2f}% "
          f"(straight line {100 * line.accuracy_barrier:.2f}%); layer moved most ({args.metric}): "
          f"{evaluation.summary()['most_moved_layer'][args.metric]}")
    _wrote(written)
    return 0


def _interpolation_curves(path: Path) -> dict[str, Any]:
    """Curves in a file written by ``fusion interpolate`` or :meth:`InterpolationCurve.save`, by label."""
    from ..analysis.interpolation import InterpolationCurve, load_interpolation_curve

    if path.suffix == ".npz":
        return {path.stem.removeprefix("interpolation_"): load_interpolation_curve(path)}
    data = load_json(path)
    if isinstance(data, dict) and isinstance(data.get("curves"), dict):
        curves = {}
        for label, values in data["curves"].items():
            try:
                curves[label] = InterpolationCurve.from_values(values["alphas"], values["loss"],
                                                               [float(v) for v in values["accuracy"]])
            except (KeyError, TypeError) as exc:
                raise DataError(f"{str(path)!r}: curve {label!r} lacks alphas/loss/accuracy ({exc})") from exc
        return curves
    return {path.stem: load_interpolation_curve(path)}


def _cmd_plot(args: argparse.Namespace) -> int:
    from ..analysis.curves import load_curve_evaluation
    from ..analysis.distances import check_metric
    from ..analysis.plots import plot_interpolation

    written: list[Path] = []
    interpolation: dict[str, Any] = {}
    folder_default = Path(args.inputs[0]).parent
    folder = Path(args.output_dir) if args.output_dir is not None else folder_default
    for path in map(Path, args.inputs):
        if not path.is_file():
            raise DataError(f"cannot plot {str(path)!r}: no such file")
        arrays = load_npz(path) if path.suffix == ".npz" else None
        if arrays is not None and "layer_names" in arrays:
            if args.kind == "interpolation":
                raise DataError(f"{str(path)!r} holds a curve evaluation, not an interpolation curve")
            metric = check_metric(args.metric or "normalized_l2")
            kinds = ("heatmap", "gif") if args.kind == "auto" else (args.kind,)
            written += _plot_curve_evaluation(load_curve_evaluation(path), folder, path.stem, metric, args.fps,
                                              args.highlight, kinds)
        elif path.suffix in (".npz", ".json"):
            if args.kind in ("heatmap", "gif"):
                raise DataError(f"{str(path)!r} holds interpolation curves; --kind {args.kind} needs a curve .npz")
            interpolation.update(_interpolation_curves(path))
        else:
            raise DataError(f"cannot plot {str(path)!r}: expected a .npz or .json result file")
    if interpolation:
        metric = args.metric or "loss"
        if metric not in ("loss", "accuracy"):
            raise DataError(f"--metric {metric} does not apply to interpolation curves; use loss or accuracy")
        stem = Path(args.inputs[0]).stem if len(args.inputs) == 1 else "interpolation"
        written.append(plot_interpolation(interpolation, folder / f"{stem}_{metric}.png", metric=metric))
    _wrote(written)
    return 0


