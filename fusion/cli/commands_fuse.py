"""Commands on two or more models: align, fuse, interpolate, distances."""


from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ..analysis.io import save_json, save_npz
from ..checkpoint import (
    save_model,
)
from .session import _echo, _evaluation, _Session, _wrote


def _cmd_align(args: argparse.Namespace) -> int:
    from ..align import align

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
    from ..demo import fuse_models, measure
    from ..evaluate import ensemble_evaluate
    from ..fuse import finetune

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
    from ..analysis.plots import plot_interpolation
    from ..demo import alignment_curves, format_barriers

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
    from ..align import align
    from ..analysis.distances import METRICS, layer_distances

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


