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


def _swap_metadata(args: argparse.Namespace, metadata: dict[str, Any], highlight: list[str]) -> None:
    """Read ``--swap-metadata`` into ``metadata["swap"]`` and highlight the swapped layer."""
    if args.swap_metadata is None:
        return
    swap = load_json(args.swap_metadata)
    if not isinstance(swap, dict) or "layer" not in swap:
        raise DataError(f"{str(args.swap_metadata)!r} is not a swap metadata file (it names no 'layer')")
    metadata["swap"] = swap
    highlight.append(swap["layer"])


def _analyse_curve(session: _Session, curve: Any, reference: Any, metadata: dict[str, Any], folder: Path,
                   label: str) -> list[Path]:
    """Evaluate ``curve`` (distances from ``reference``) and the straight line between its end points; write the
    npz, the summary JSON, the straight line and the plots into ``folder``; print one line."""
    from ..analysis.curves import evaluate_curve
    from ..analysis.interpolation import has_batch_norm, interpolation_curve
    from ..analysis.plots import plot_interpolation

    args = session.args
    train, test = session.loaders
    highlight = list(args.highlight or [])
    _swap_metadata(args, metadata, highlight)
    evaluation = evaluate_curve(curve, test, num_points=args.num_points, bn_data=train, reference=reference,
                                progress=session.progress)
    line = interpolation_curve(curve.start, curve.end, test, steps=args.num_points,
                               reset_bn=has_batch_norm(curve.start), bn_data=train, progress=session.progress)
    written = list(evaluation.save(folder / "layer_distances_along_curve.npz", folder / CURVE_SUMMARY, metadata=metadata))
    line.save(folder / "straight_line.npz")
    written.append(folder / "straight_line.npz")
    written += _plot_curve_evaluation(evaluation, folder, "layer_distances_evolution", args.metric, args.fps,
                                      highlight, ("heatmap", "gif"))
    written.append(plot_interpolation({"straight line": line, "Bezier curve": evaluation}, folder / "curve_loss.png"))
    _echo(f"{label}: loss barrier {evaluation.barrier:.4f} (straight line {line.barrier:.4f}), accuracy barrier "
          f"{100 * evaluation.accuracy_barrier:.2f}% (straight line {100 * line.accuracy_barrier:.2f}%); layer moved "
          f"most ({args.metric}): {evaluation.summary()['most_moved_layer'][args.metric]}")
    return written


def _cmd_curve(args: argparse.Namespace) -> int:
    from ..analysis.curves import train_bezier_curve

    session = _Session(args)
    model_a, model_b = session.models(args.models, 2, 2)
    train, _ = session.loaders
    metadata: dict[str, Any] = {"model_a": str(args.models[0]), "model_b": str(args.models[1]),
                                "epochs": args.epochs, "num_bends": args.num_bends, "lr": args.lr,
                                "momentum": args.momentum, "weight_decay": args.weight_decay, "seed": args.seed}
    curve = train_bezier_curve(model_a, model_b, train, epochs=args.epochs, num_bends=args.num_bends, lr=args.lr,
                               momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed,
                               progress=session.progress)
    folder = session.output_dir("results/curve")
    written = [save_model(curve, folder / "curve.pt")]
    written += _analyse_curve(session, curve, model_a, metadata, folder,
                              f"Bezier curve ({args.num_bends} bends, {args.epochs} epochs)")
    _wrote(written)
    return 0


def _load_curve(session: _Session, path: Path) -> Any:
    """The :class:`BezierCurve` saved by ``fusion curve`` at ``path`` (end points of ``--arch``; bends from the file)."""
    from ..analysis.curves import BezierCurve
    from ..checkpoint import load_state_dict

    state = load_state_dict(path)
    if not any(key.startswith("start.") for key in state) or not any(key.startswith("end.") for key in state):
        raise DataError(f"{str(path)!r} is not a curve checkpoint of 'fusion curve' (no start./end. tensors)")
    controls = {key.split(".")[1] for key in state if key.startswith("controls.")}
    endpoint = session.model(None)
    curve = BezierCurve(endpoint, endpoint, num_bends=len(controls) + 2)
    expected = curve.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        wrong = sorted(set(state) ^ set(expected)) or [k for k in state if state[k].shape != expected[k].shape]
        raise DataError(f"curve checkpoint {str(path)!r} does not fit --arch {session.args.arch!r}: e.g. {wrong[0]!r}")
    curve.load_state_dict(state)
    return curve.to(session.args.device)


def _cmd_analyze_curve(args: argparse.Namespace) -> int:
    session = _Session(args)
    curve = _load_curve(session, args.curve_checkpoint)
    reference = session.model(args.original_checkpoint) if args.original_checkpoint is not None else curve.start
    metadata: dict[str, Any] = {"curve_checkpoint": str(args.curve_checkpoint), "num_bends": curve.num_bends,
                                "original_checkpoint": str(args.original_checkpoint or "curve start")}
    folder = args.output_dir if args.output_dir is not None else Path(args.curve_checkpoint).parent
    written = _analyse_curve(session, curve, reference, metadata, Path(folder), f"curve {args.curve_checkpoint}")
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


def _plot_output(args: argparse.Namespace, inputs: list[Path]) -> Path | None:
    """``--output``, checked: one input, no ``--output-dir``, a suffix that names a plot."""
    if args.output is None:
        if args.heatmap and args.kind not in ("auto", "heatmap"):
            raise DataError("--heatmap goes with --output ANIMATION.gif or --kind auto/heatmap")
        return None
    if args.output_dir is not None:
        raise DataError("give either --output FILE or --output-dir FOLDER, not both")
    if len(inputs) != 1:
        raise DataError(f"--output writes one plot of one result file; got {len(inputs)} files")
    if args.output.suffix.lower() not in (".gif", ".png", ".pdf", ".svg", ".jpg"):
        raise DataError(f"--output {str(args.output)!r}: expected a .gif animation or an image (.png, .pdf, .svg)")
    return Path(args.output)


def _cmd_plot(args: argparse.Namespace) -> int:
    from ..analysis.curves import load_curve_evaluation
    from ..analysis.distances import check_metric
    from ..analysis.plots import animate_layer_distances, plot_distance_heatmap, plot_interpolation

    inputs = [*map(Path, args.inputs), *map(Path, args.data)]
    if not inputs:
        raise DataError("name the result files to plot (FILE ... or --data FILE)")
    output = _plot_output(args, inputs)
    written: list[Path] = []
    interpolation: dict[str, Any] = {}
    folder = Path(args.output_dir) if args.output_dir is not None else inputs[0].parent
    for path in inputs:
        if not path.is_file():
            raise DataError(f"cannot plot {str(path)!r}: no such file")
        arrays = load_npz(path) if path.suffix == ".npz" else None
        if arrays is not None and "layer_names" in arrays:
            if args.kind == "interpolation":
                raise DataError(f"{str(path)!r} holds a curve evaluation, not an interpolation curve")
            metric = check_metric(args.metric or "normalized_l2")
            evaluation = load_curve_evaluation(path)
            if output is None:
                kinds = ("heatmap", "gif") if args.kind == "auto" else (args.kind,)
                written += _plot_curve_evaluation(evaluation, folder, path.stem, metric, args.fps, args.highlight, kinds)
                continue
            kind = args.kind if args.kind != "auto" else ("gif" if output.suffix.lower() == ".gif" else "heatmap")
            if (kind == "gif") != (output.suffix.lower() == ".gif"):
                raise DataError(f"--kind {kind} cannot be written to {str(output)!r}: animations are .gif files")
            highlight = args.highlight or None
            if kind == "gif":
                written.append(animate_layer_distances(evaluation, output, fps=args.fps, metric=metric,
                                                       highlight=highlight))
                if args.heatmap:
                    written.append(plot_distance_heatmap(evaluation, output.with_name(f"{output.stem}_heatmap.png"),
                                                         metric=metric, highlight=highlight))
            else:
                written.append(plot_distance_heatmap(evaluation, output, metric=metric, highlight=highlight))
        elif path.suffix in (".npz", ".json"):
            if args.kind in ("heatmap", "gif") or args.heatmap:
                raise DataError(f"{str(path)!r} holds interpolation curves; heatmaps and GIFs need a curve .npz")
            interpolation.update(_interpolation_curves(path))
        else:
            raise DataError(f"cannot plot {str(path)!r}: expected a .npz or .json result file")
    if interpolation:
        metric = args.metric or "loss"
        if metric not in ("loss", "accuracy"):
            raise DataError(f"--metric {metric} does not apply to interpolation curves; use loss or accuracy")
        if output is not None and output.suffix.lower() == ".gif":
            raise DataError(f"interpolation curves are drawn as images, not as {str(output)!r}")
        stem = inputs[0].stem if len(inputs) == 1 else "interpolation"
        target = output if output is not None else folder / f"{stem}_{metric}.png"
        written.append(plot_interpolation(interpolation, target, metric=metric))
    _wrote(written)
    return 0
