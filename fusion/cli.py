"""The ``fusion`` command line (also ``python -m fusion``).

Subcommands (``fusion <command> --help`` for their options):

* ``demo``: train, align and fuse small models on the embedded digits data and print a comparison;
* ``spec``: print a model's permutation groups and how much of it they cover;
* ``swap``: swap two neurons of a layer (function-preserving), save the model and a metadata JSON;
* ``align``: align model B to model A (weight / activation matching, optimal transport);
* ``fuse``: fuse models (average, merge, merge-repair, ot, transplant);
* ``interpolate`` (alias ``barrier``): loss and accuracy along the straight line, naive and aligned;
* ``distances``: per-layer weight distances between two models;
* ``curve``: train a Bézier curve between two models and analyse it (npz, summary, heatmap, GIF);
* ``plot``: re-plot saved results.

Models are named by ``--arch``: a reference model of :mod:`fusion.models` (``mlp``, ``vgg``,
``resnet``), a torchvision name (``resnet18`` with ``--num-classes``) or ``module:Class``; their
checkpoints are ``torch.save`` state dicts or ``.safetensors`` files (see :mod:`fusion.checkpoint`).
Reference models take their input size and class count from the data set unless ``--arch-kwargs``
says otherwise. Results are written atomically to ``--output-dir``.

Bad input (a missing checkpoint, an unknown architecture, an unreadable file, an absent data folder)
prints one line, ``fusion: error: ...``, to stderr and exits with status 1; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis.io import load_json, load_npz, save_json, save_npz
from .checkpoint import (
    ARCH_KEY,
    KWARGS_KEY,
    architecture_metadata,
    build_architecture,
    load_model,
    read_metadata,
    save_model,
)
from .data import DATASETS, DataSplit, example_batch, get_data, make_loaders
from .errors import DataError, FusionError, PermutationError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("fusion.cli")

ALIGN_METHODS = ("weight", "activation", "ot")
FUSE_METHODS = ("average", "merge", "merge-repair", "ot", "transplant")
DISTANCE_METRICS = ("normalized_l2", "relative", "raw_l2")
CURVE_SUMMARY = "analysis_summary.json"

# --------------------------------------------------------------------------------------------
# Shared options
# --------------------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 3,32,32, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes such as 3,32,32, got {text!r}")
    return shape


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 8}}', got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("general")
    group.add_argument("--output-dir", type=Path, help="folder for the results (created if needed)")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    return parent


def _model_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument(
        "--arch",
        help="architecture: mlp | vgg | resnet (fusion.models), a torchvision name (resnet18, vit_b_16, ...) or "
        "module:Class; may be omitted for .safetensors files written by fusion",
    )
    group.add_argument("--num-classes", type=_positive_int, help="outputs of the model (default: the data set's)")
    group.add_argument("--arch-kwargs", type=_json_object, default={}, metavar="JSON",
                       help="constructor arguments as a JSON object, e.g. '{\"hidden\": [64, 64]}'")
    group.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    return parent


def _data_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("data")
    group.add_argument("--dataset", default="digits", choices=DATASETS,
                       help="data set (default digits: embedded, offline); the others are read from --data-root")
    group.add_argument("--data-root", type=Path,
                       help="folder holding cifar-10-batches-py/, cifar-100-python/ or MNIST/")
    group.add_argument("--image-size", type=_positive_int, help="resize the 8x8 digits to this size (digits only)")
    group.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (default 128)")
    group.add_argument("--limit", type=_positive_int, help="use at most this many samples of each split")
    return parent


def _input_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--input-shape", type=_shape, metavar="C,H,W",
                        help="trace with random inputs of this shape (no batch dimension) instead of data")
    return parent


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Append a meaningful default to an option's help (unless the help already mentions one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], {}, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


# --------------------------------------------------------------------------------------------
# Session helpers: data, models, outputs
# --------------------------------------------------------------------------------------------


class _Session:
    """Data and models of one command, loaded on first use."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.progress = not args.quiet
        self._split: DataSplit | None = None
        self._loaders: tuple[Any, Any] | None = None
        self._stored_architecture: dict[str, str] = {}  # from the inputs' metadata when --arch is not given

    @property
    def split(self) -> DataSplit:
        if self._split is None:
            args = self.args
            kwargs: dict[str, Any] = {}
            if args.image_size is not None:
                if args.dataset != "digits":
                    raise DataError(f"--image-size applies to the digits data set only, not {args.dataset!r}")
                kwargs["image_size"] = args.image_size
            self._split = get_data(args.dataset, args.data_root, seed=args.seed, limit=args.limit, **kwargs)
        return self._split

    @property
    def loaders(self) -> tuple[Any, Any]:
        """``(train, test)`` loaders."""
        if self._loaders is None:
            self._loaders = make_loaders(self.split, batch_size=self.args.batch_size, seed=self.args.seed)
        return self._loaders

    @property
    def uses_data(self) -> bool:
        return getattr(self.args, "input_shape", None) is None

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self.split.input_shape if self.uses_data else self.args.input_shape

    @property
    def num_classes(self) -> int | None:
        if self.args.num_classes is not None:
            return self.args.num_classes
        return self.split.num_classes if self.uses_data else None

    def example_inputs(self, count: int = 16) -> torch.Tensor:
        """A batch for tracing: training inputs, or seeded random inputs of ``--input-shape``."""
        if self.uses_data:
            return example_batch(self.split, count)
        generator = torch.Generator().manual_seed(self.args.seed)
        return torch.randn((count, *self.args.input_shape), generator=generator)

    def model(self, path: Path | None) -> nn.Module:
        """The checkpoint at ``path`` (or a freshly initialised model when ``path`` is None), in eval mode."""
        args = self.args
        if path is None:
            if args.arch is None:
                raise DataError("pass --arch (and a checkpoint, or a fresh randomly initialised model is used)")
            model = build_architecture(args.arch, self.num_classes, self.input_shape, **args.arch_kwargs)
            return model.to(args.device).eval()
        if args.arch is None and not self._stored_architecture:
            stored = read_metadata(path)
            self._stored_architecture = {k: stored[k] for k in (ARCH_KEY, KWARGS_KEY) if k in stored}
        return load_model(path, args.arch, self.num_classes, self.input_shape, args.device, **args.arch_kwargs)

    def models(self, paths: Sequence[Path], minimum: int, maximum: int | None = None) -> list[nn.Module]:
        if len(paths) < minimum or (maximum is not None and len(paths) > maximum):
            wanted = str(minimum) if maximum == minimum else f"at least {minimum}"
            raise DataError(f"expected {wanted} checkpoints, got {len(paths)}")
        return [self.model(Path(p)) for p in paths]

    def output_dir(self, default: str) -> Path:
        return Path(self.args.output_dir) if self.args.output_dir is not None else Path(default)

    def metadata(self) -> dict[str, str]:
        """Architecture metadata stored in ``.safetensors`` outputs (so later commands need no --arch)."""
        if self.args.arch is None:
            return dict(self._stored_architecture)
        kwargs = dict(self.args.arch_kwargs)
        if self.num_classes is not None:
            kwargs.setdefault("num_classes", self.num_classes)
        return architecture_metadata(self.args.arch, **kwargs)

    def checkpoint_path(self, folder: Path, stem: str, like: Path | str | None) -> Path:
        suffix = getattr(self.args, "format", None)
        if suffix is None:
            suffix = "safetensors" if like is not None and str(like).endswith(".safetensors") else "pt"
        return folder / f"{stem}.{suffix}"


def _evaluation(model: nn.Module, data: Any) -> dict[str, float]:
    from .evaluate import evaluate

    result = evaluate(model, data)
    return {"accuracy": result.accuracy, "loss": result.loss}


def _echo(text: str) -> None:
    print(text, flush=True)


def _wrote(paths: Sequence[Path]) -> None:
    for path in paths:
        _echo(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.threads is None:  # the demo's models are tiny: one thread avoids oversubscribing the cores
        torch.set_num_threads(1)
    output = Path(args.output_dir) if args.output_dir is not None else Path("results/demo")
    result = run_demo(output, quick=args.quick, seed=args.seed, progress=not args.quiet)
    _echo(result.report())
    _wrote(result.files)
    _echo(f"demo finished in {result.seconds:.1f} s")
    return 0


def _spec_dict(spec: Any) -> dict[str, Any]:
    return {
        "architecture": spec.architecture,
        "groups": [
            {"name": g.name, "size": g.size, "kind": g.kind, "producers": list(g.producers),
             "consumers": list(g.consumers), "tensors": [[m.name, m.axis] for m in g.members]}
            for g in spec.groups
        ],
        "skipped": [{"name": s.name, "size": s.size, "reason": s.reason} for s in spec.skipped],
    }


def _cmd_spec(args: argparse.Namespace) -> int:
    from .coverage import permutation_coverage
    from .spec import permutation_spec

    session = _Session(args)
    model = session.model(args.checkpoint)
    example = session.example_inputs(4)
    started = time.perf_counter()
    spec = permutation_spec(model, example)
    seconds = time.perf_counter() - started
    coverage = permutation_coverage(model, example, spec=spec, seed=args.seed, label=args.arch or str(args.checkpoint))
    _echo(spec.summary())
    _echo(
        f"coverage: {coverage.groups} groups, {100 * coverage.hidden_groups_permuted:.1f}% of hidden unit sets "
        f"permutable, {100 * coverage.params_changed:.1f}% of parameter elements moved by a random permutation, "
        f"max relative output difference {coverage.max_rel_diff:.2e}, spec built in {seconds:.2f} s"
    )
    if args.output_dir is not None:
        path = save_json({**_spec_dict(spec), "coverage": coverage.to_dict(), "spec_seconds": seconds},
                         Path(args.output_dir) / "spec.json")
        _wrote([path])
    return 0


def _depth_layer(spec: Any, depth: str) -> str:
    """The layer producing the first / middle / last permutable channel group (convolutions preferred)."""
    groups = [g for g in spec.groups if g.kind == "channels"]
    if not groups:
        raise PermutationError("the model has no permutable layer")
    layers = [g.name if g.name in g.producers else g.producers[0] for g in groups]
    index = {"early": 0, "mid": len(layers) // 2, "late": len(layers) - 1}[depth]
    return layers[index]


def _cmd_swap(args: argparse.Namespace) -> int:
    from .permute import swap_neurons, verify_equivalence
    from .spec import permutation_spec

    session = _Session(args)
    model = session.model(args.checkpoint)
    spec = permutation_spec(model, session.example_inputs(4))
    layer = args.layer if args.layer is not None else _depth_layer(spec, args.depth)
    group = spec.group_of_layer(layer)
    if args.neurons is not None:
        i, j = args.neurons
    else:
        generator = torch.Generator().manual_seed(args.seed)
        i, j = (int(k) for k in torch.randperm(group.size, generator=generator)[:2])
    if i == j:
        raise PermutationError(f"--neurons must name two different units, got {i} and {j}")
    swapped = swap_neurons(model, layer, i, j, spec=spec)
    folder = session.output_dir("results/swap")
    stem = f"{Path(args.checkpoint).stem}_swap_{layer.replace('.', '-')}_{i}_{j}"
    path = Path(args.output) if args.output is not None else session.checkpoint_path(folder, stem, args.checkpoint)
    metadata: dict[str, Any] = {
        "source_checkpoint": str(args.checkpoint),
        "checkpoint": str(path),
        "arch": args.arch,
        "layer": layer,
        "depth": args.depth if args.layer is None else None,
        "group": group.name,
        "group_size": group.size,
        "neurons": [i, j],
        "tensors_moved": [m.name for m in group.members],
        "seed": args.seed,
    }
    if args.verify:
        inputs = session.example_inputs(256) if not session.uses_data else _test_inputs(session, 512)
        difference = verify_equivalence(model, swapped, inputs)
        metadata["verification"] = {"max_relative_difference": difference, "tolerance": args.tol,
                                    "passed": difference <= args.tol, "num_inputs": int(inputs.shape[0])}
        _echo(f"verify: max relative output difference {difference:.3e} on {inputs.shape[0]} inputs "
              f"({'equivalent' if difference <= args.tol else 'NOT equivalent'} at tolerance {args.tol:g})")
        if difference > args.tol:
            raise PermutationError(
                f"the swapped model differs from the original by {difference:.3e} > --tol {args.tol:g}"
            )
    written = [save_model(swapped, path, session.metadata())]
    written.append(save_json(metadata, path.with_name(f"{path.stem}_metadata.json")))
    _echo(f"swapped units {i} and {j} of {layer!r} (group {group.name!r}, {group.size} units, "
          f"{len(group.members)} tensors moved)")
    _wrote(written)
    return 0


def _test_inputs(session: _Session, count: int) -> torch.Tensor:
    """Up to ``count`` test inputs in one tensor."""
    test = session.split.test
    return torch.stack([torch.as_tensor(test[k][0]) for k in range(min(count, len(test)))])


def _cmd_align(args: argparse.Namespace) -> int:
    from .align import align

    session = _Session(args)
    model_a, model_b = session.models(args.models, 2, 2)
    train, _ = session.loaders
    started = time.perf_counter()
    result = align(model_a, model_b, session.example_inputs(), method=args.method, data=train,
                   max_iter=args.max_iter, seed=args.seed, progress=session.progress, cost=args.cost,
                   solver=args.solver, reg=args.reg)
    seconds = time.perf_counter() - started
    folder = session.output_dir("results/align")
    path = session.checkpoint_path(folder, "aligned", args.models[1])
    summary = {
        "model_a": str(args.models[0]),
        "model_b": str(args.models[1]),
        "checkpoint": str(path),
        "method": result.method,
        "cost": result.cost,
        "history": result.history,
        "iterations": result.iterations,
        "seconds": seconds,
        "fallback": list(result.fallback),
        "units_moved": {name: int((perm != torch.arange(perm.numel())).sum()) for name, perm in result.perms.items()},
        "perms": {name: perm.tolist() for name, perm in result.perms.items()},
        "transport_shapes": {name: list(plan.shape) for name, plan in result.transport.items()},
    }
    written = [save_model(result.model, path, session.metadata()), save_json(summary, folder / "alignment.json")]
    _echo(f"aligned {args.models[1]} to {args.models[0]} with {result.method} matching: objective {result.cost:.6g} "
          f"after {result.iterations} iterations ({seconds:.2f} s); "
          f"{sum(summary['units_moved'].values())} units moved")
    _wrote(written)
    return 0


def _cmd_fuse(args: argparse.Namespace) -> int:
    from .demo import fuse_models, measure
    from .evaluate import ensemble_evaluate
    from .fuse import finetune

    session = _Session(args)
    models = session.models(args.models, 2)
    train, test = session.loaders
    fused, cost = measure(fuse_models, args.method, models, session.example_inputs(), train, session.progress,
                          args.seed)
    one_shot = _evaluation(fused, test)
    summary: dict[str, Any] = {
        "method": args.method,
        "models": [str(p) for p in args.models],
        "seconds": cost.seconds,
        "peak_memory_mb": cost.peak_memory_mb,
        "fused": one_shot,
        "members": [_evaluation(m, test) for m in models],
    }
    ensemble = ensemble_evaluate(models, test)
    summary["ensemble"] = {"accuracy": ensemble.accuracy, "loss": ensemble.loss}
    if args.finetune_epochs > 0:
        fused, tuning = measure(finetune, fused, train, epochs=args.finetune_epochs, lr=args.lr, seed=args.seed,
                                progress=session.progress)
        summary["finetune"] = {"epochs": args.finetune_epochs, "lr": args.lr, "seconds": tuning.seconds,
                               **_evaluation(fused, test)}
    folder = session.output_dir("results/fuse")
    path = session.checkpoint_path(folder, "fused", args.models[0])
    summary["checkpoint"] = str(path)
    written = [save_model(fused, path, session.metadata()), save_json(summary, folder / "fusion.json")]
    best = max(summary["members"], key=lambda r: r["accuracy"])
    line = (f"{args.method}: test accuracy {100 * one_shot['accuracy']:.2f}% (loss {one_shot['loss']:.4f}) in "
            f"{cost.seconds:.2f} s; best member {100 * best['accuracy']:.2f}%, ensemble {100 * ensemble.accuracy:.2f}%")
    if "finetune" in summary:
        line += f"; after {args.finetune_epochs} fine-tuning epoch(s) {100 * summary['finetune']['accuracy']:.2f}%"
    _echo(line)
    _wrote(written)
    return 0


def _cmd_interpolate(args: argparse.Namespace) -> int:
    from .analysis.plots import plot_interpolation
    from .demo import alignment_curves, format_barriers

    session = _Session(args)
    model_a, model_b = session.models(args.models, 2, 2)
    train, test = session.loaders
    curves = alignment_curves(model_a, model_b, test, session.example_inputs(), methods=args.align, steps=args.steps,
                              bn_data=train, progress=session.progress, seed=args.seed)
    folder = session.output_dir("results/interpolate")
    summary = {"model_a": str(args.models[0]), "model_b": str(args.models[1]),
               "curves": {label: curve.to_dict() for label, curve in curves.items()}}
    written = [save_json(summary, folder / "interpolation.json")]
    for label, curve in curves.items():
        path = folder / f"interpolation_{label}.npz"
        curve.save(path)
        written.append(path)
    for metric in ("loss", "accuracy"):
        written.append(plot_interpolation(curves, folder / f"interpolation_{metric}.png", metric=metric))
    _echo(format_barriers({"": curves}))
    _wrote(written)
    return 0


def _cmd_distances(args: argparse.Namespace) -> int:
    from .align import align
    from .analysis.distances import METRICS, layer_distances

    session = _Session(args)
    model_a, model_b = session.models(args.models, 2, 2)
    if args.align is not None:
        train, _ = session.loaders
        model_b = align(model_a, model_b, session.example_inputs(), method=args.align, data=train, seed=args.seed,
                        progress=session.progress).model
    distances = layer_distances(model_a, model_b, aggregate=args.aggregate, include_buffers=args.include_buffers)
    folder = session.output_dir("results/distances")
    summary = {"model_a": str(args.models[0]), "model_b": str(args.models[1]), "aligned_with": args.align,
               "aggregate": args.aggregate, **distances.to_dict(),
               "most_moved": {m: distances.most_moved(m) for m in METRICS} if distances.names else {}}
    arrays = {"names": list(distances.names), "num_params": distances.num_params,
              **{m: distances.metric(m) for m in METRICS}}
    written = [save_json(summary, folder / "distances.json"), save_npz(folder / "distances.npz", arrays)]
    order = sorted(range(len(distances.names)), key=lambda k: -distances.normalized_l2[k])
    width = max([len(n) for n in distances.names] + [5])
    _echo(f"{'layer':<{width}}  {'raw_l2':>10}  {'normalized_l2':>13}  {'relative':>9}")
    for k in order[: args.top]:
        _echo(f"{distances.names[k]:<{width}}  {distances.raw_l2[k]:>10.4g}  {distances.normalized_l2[k]:>13.4g}  "
              f"{distances.relative[k]:>9.4g}")
    _wrote(written)
    return 0


def _plot_curve_evaluation(evaluation: Any, folder: Path, stem: str, metric: str, fps: int,
                           highlight: Sequence[str] | None, kinds: Sequence[str]) -> list[Path]:
    from .analysis.plots import animate_layer_distances, plot_distance_heatmap

    written = []
    if "heatmap" in kinds:
        written.append(plot_distance_heatmap(evaluation, folder / f"{stem}_heatmap.png", metric=metric,
                                             highlight=highlight or None))
    if "gif" in kinds:
        written.append(animate_layer_distances(evaluation, folder / f"{stem}.gif", fps=fps, metric=metric,
                                               highlight=highlight or None))
    return written


def _cmd_curve(args: argparse.Namespace) -> int:
    from .analysis.curves import evaluate_curve, train_bezier_curve
    from .analysis.interpolation import has_batch_norm, interpolation_curve
    from .analysis.plots import plot_interpolation

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
    from .analysis.interpolation import InterpolationCurve, load_interpolation_curve

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
    from .analysis.curves import load_curve_evaluation
    from .analysis.distances import check_metric
    from .analysis.plots import plot_interpolation

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


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def _two_models(parser: argparse.ArgumentParser, nargs: str = "*") -> None:
    parser.add_argument("models", nargs=nargs, type=Path, metavar="CHECKPOINT",
                        help="checkpoints (.pt/.pth state dicts or .safetensors)")


def _format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("pt", "safetensors"),
                        help="checkpoint format of the output (default: that of the input)")


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="JSON or YAML file of option values (keys as the long options, e.g. method, "
                        "finetune_epochs, models); flags given on the command line win")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fusion`` command (subcommands with their handlers as ``func``)."""
    parser = argparse.ArgumentParser(
        prog="fusion",
        description="Compare, align and fuse PyTorch models through their permutation symmetries.",
        epilog="Run 'fusion <command> --help' for the options of a command; 'fusion demo' for a first look.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fusion {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    common, model, data, inputs = _common_options(), _model_options(), _data_options(), _input_options()

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str, parents: list,
            aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=parents,
                                  formatter_class=_Formatter, aliases=list(aliases))
        sub.set_defaults(func=handler, subparser=sub)
        return sub

    demo = add("demo", _cmd_demo, "train, align and fuse small models on the embedded digits data and compare "
               "every fusion method (default output: results/demo; one torch thread unless --threads)", [common])
    demo.add_argument("--quick", action="store_true", help="a tiny budget (a few seconds; for tests)")

    spec = add("spec", _cmd_spec, "print a model's permutation groups and their coverage",
               [common, model, data, inputs])
    spec.add_argument("checkpoint", nargs="?", type=Path, help="checkpoint (default: a randomly initialised --arch)")

    swap = add("swap", _cmd_swap, "swap two neurons of a layer without changing the function; save the model and "
               "a metadata JSON naming what was swapped (default output: results/swap)", [common, model, data, inputs])
    swap.add_argument("checkpoint", type=Path, help="checkpoint of the model")
    where = swap.add_mutually_exclusive_group(required=True)
    where.add_argument("--layer", help="module whose output units are swapped (e.g. features.4)")
    where.add_argument("--depth", choices=("early", "mid", "late"),
                       help="pick the first, middle or last permutable layer instead of naming one")
    swap.add_argument("--neurons", type=int, nargs=2, metavar=("I", "J"),
                      help="the two units (default: random by --seed)")
    swap.add_argument("--verify", action="store_true", help="check functional equivalence on test inputs")
    swap.add_argument("--tol", type=float, default=1e-5, help="largest accepted relative output difference")
    swap.add_argument("--output", type=Path, help="path of the swapped checkpoint (default: in --output-dir)")
    _format_option(swap)

    align = add("align", _cmd_align, "align model B (second checkpoint) to model A; write the aligned checkpoint "
                "and alignment.json (default output: results/align)", [common, model, data])
    _two_models(align)
    align.add_argument("--method", choices=ALIGN_METHODS, default="weight", help="alignment method")
    align.add_argument("--max-iter", type=_positive_int, default=100, help="most weight-matching sweeps")
    align.add_argument("--cost", choices=("weight", "activation"), default="weight", help="ground cost of --method ot")
    align.add_argument("--solver", choices=("emd", "sinkhorn"), default="emd", help="transport solver of --method ot")
    align.add_argument("--reg", type=float, default=0.01, help="entropic regularisation of the sinkhorn solver")
    _format_option(align)
    _config_option(align)

    fuse = add("fuse", _cmd_fuse, "fuse two or more models into one; write the fused checkpoint and fusion.json "
               "(default output: results/fuse)", [common, model, data])
    _two_models(fuse)
    fuse.add_argument("--method", choices=FUSE_METHODS, default="merge",
                      help="average: vanilla averaging; merge: weight matching then averaging; merge-repair: with "
                      "REPAIR; ot: optimal-transport fusion; transplant: neuron transplantation")
    fuse.add_argument("--finetune-epochs", type=_non_negative_int, default=0, help="fine-tune the fused model")
    fuse.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (Adam)")
    _format_option(fuse)
    _config_option(fuse)

    interp = add("interpolate", _cmd_interpolate, "loss and accuracy along the straight line between two models, "
                 "naive and after alignment; JSON, npz and PNG (default output: results/interpolate)",
                 [common, model, data], aliases=("barrier",))
    _two_models(interp)
    interp.add_argument("--align", nargs="*", choices=ALIGN_METHODS, default=[],
                        help="also align B to A with these methods first (e.g. --align weight ot)")
    interp.add_argument("--steps", type=_positive_int, default=21, help="points on the line, end points included")

    dist = add("distances", _cmd_distances, "per-layer weight distances of model B from model A (JSON and npz; "
               "default output: results/distances)", [common, model, data])
    _two_models(dist)
    dist.add_argument("--aggregate", choices=("module", "parameter"), default="module", help="one row per ...")
    dist.add_argument("--include-buffers", action="store_true", help="also compare BatchNorm statistics")
    dist.add_argument("--align", choices=ALIGN_METHODS, help="align B to A first")
    dist.add_argument("--top", type=_positive_int, default=10, help="rows to print")

    curve = add("curve", _cmd_curve, "train a Bezier curve between two models and analyse it: npz, "
                "analysis_summary.json, heatmap PNG and GIF (default output: results/curve)", [common, model, data])
    _two_models(curve)
    curve.add_argument("--epochs", type=_non_negative_int, default=5, help="curve training epochs")
    curve.add_argument("--num-bends", type=int, default=3, help="Bezier bends including the end points")
    curve.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of the control points")
    curve.add_argument("--num-points", type=int, default=61, help="points evaluated along the curve")
    curve.add_argument("--metric", choices=DISTANCE_METRICS, default="normalized_l2", help="distance in the plots")
    curve.add_argument("--fps", type=_positive_int, default=10, help="frames per second of the GIF")
    curve.add_argument("--highlight", nargs="*", metavar="LAYER", help="layers drawn in red")
    curve.add_argument("--swap-metadata", type=Path, metavar="JSON",
                       help="metadata of 'fusion swap': highlights the swapped layer and goes into the summary")

    plot = add("plot", _cmd_plot, "re-plot saved results: a curve .npz gives a heatmap and a GIF; interpolation "
               ".npz/.json files give one curve plot (default output: next to the first input)", [common])
    plot.add_argument("inputs", nargs="+", type=Path, metavar="FILE", help="result files (.npz or .json)")
    plot.add_argument("--kind", choices=("auto", "heatmap", "gif", "interpolation"), default="auto",
                      help="what to draw")
    plot.add_argument("--metric", choices=(*DISTANCE_METRICS, "loss", "accuracy"),
                      help="distance metric (curves; default normalized_l2) or loss/accuracy (interpolation; "
                      "default loss)")
    plot.add_argument("--fps", type=_positive_int, default=10, help="frames per second of the GIF")
    plot.add_argument("--highlight", nargs="*", metavar="LAYER", help="layers drawn in red")
    return parser


# --------------------------------------------------------------------------------------------
# Config files and entry point
# --------------------------------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise DataError("reading a YAML config needs PyYAML (pip install pyyaml); or use JSON") from None
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DataError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    else:
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise DataError(f"config file {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise DataError(f"config file {str(path)!r} must hold a mapping of option names to values")
    return config


def _config_defaults(sub: argparse.ArgumentParser, config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Validate config values against ``sub``'s options (type conversion and choices) and return them by dest."""
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config", "func", "subparser")}
    defaults = {}
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise DataError(f"config file {str(path)!r}: unknown option {key!r}; known: {', '.join(sorted(actions))}")
        action = actions[dest]
        many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
        values = value if isinstance(value, list) else [value]
        if not many and len(values) != 1:
            raise DataError(f"config file {str(path)!r}: option {key!r} takes one value, got {value!r}")
        converted = []
        for item in values:
            if action.type is not None and isinstance(item, str):
                try:
                    item = action.type(item)
                except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
                    raise DataError(f"config file {str(path)!r}: bad value {item!r} for {key!r}: {exc}") from None
            if action.choices is not None and item not in action.choices:
                raise DataError(
                    f"config file {str(path)!r}: {key!r} must be one of {list(action.choices)}, got {item!r}"
                )
            converted.append(item)
        defaults[dest] = converted if many else converted[0]
    return defaults


def _configure(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="fusion: %(levelname)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch_pruning")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, FusionError) and exc.filename is not None:
        text = f"{exc.strerror or text}: {exc.filename}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fusion`` command line with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Returns:
        0 on success, 1 when the command failed on bad input (one ``fusion: error: ...`` line on
        stderr), 2 for usage errors (argparse exits by raising SystemExit).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()  # restored afterwards: main() may run inside a longer-lived process
    try:
        if getattr(args, "config", None) is not None:
            sub = args.subparser
            sub.set_defaults(**_config_defaults(sub, _read_config(args.config), args.config))
            args = parser.parse_args(argv)
        _configure(args)
        return int(args.func(args) or 0)
    except (FusionError, OSError) as exc:
        print(f"fusion: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fusion: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
