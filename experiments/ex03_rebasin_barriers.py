"""Experiment 03: the loss barrier between two networks against their width, naive and after alignment (Git Re-Basin).

Ainsworth, Hayase & Srinivasa (ICLR 2023), "Git Re-Basin": two networks trained from different seeds
are separated by a loss barrier on the straight line between them; after permuting one of them into
the other's basis the barrier shrinks, and it shrinks further as the networks get wider. Jordan et al.
(ICLR 2023), "REPAIR", restore the neuron statistics that interpolation collapses, and report that
this removes 60-100% of the barrier that remains after alignment in normalised CNNs.

Families (``--families``; default ``mlp`` on digits, all three on mnist1d):

* ``mlp``: an MLP with hidden widths ``32 x m`` three times;
* ``cnn-bn``: the 1-D residual CNN :class:`fusion.models.ResNet1d` with BatchNorm, stage widths ``8m, 16m, 32m``
  (needs 1-D inputs: mnist1d);
* ``cnn-ln``: the same CNN with a LayerNorm over channels and length (``GroupNorm(1, C)``).

For each width multiplier ``m``, two networks are trained on the data from seeds ``seed`` and
``seed + 1``; model B is aligned to A by weight matching, activation matching and optimal transport,
and the interpolation curve is measured naive and after each alignment, each also with REPAIR applied
at every point (``fusion.repair`` with the endpoints weighted ``1 - alpha`` and ``alpha``); BatchNorm
networks are also measured with their statistics reset at every point (Git Re-Basin's "BN reset"),
which is the baseline REPAIR is compared with for them. ``repair_reduction`` is
``1 - barrier(X + REPAIR) / barrier(X)`` for each alignment X (X with BN reset for BatchNorm networks).
Outputs: ``results.json`` (all curves and barriers; ``partial.json`` holds the widths finished so far)
and ``barrier_vs_width_<family>.png``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import excommon as common
import numpy as np
from torch import nn

from fusion import align, evaluate, interpolate, interpolation_curve, repair
from fusion.analysis.interpolation import InterpolationCurve
from fusion.analysis.io import save_json
from fusion.errors import DataError
from fusion.models import MLP, ResNet1d

NAME = "ex03_rebasin_barriers"
ALIGNMENTS = ("naive", "weight", "activation", "ot")
FAMILIES = ("mlp", "cnn-bn", "cnn-ln")
BN_RESET = " + BN reset"
REPAIR = " + REPAIR"


def builder(family: str, split: Any, width: int) -> tuple[Callable[[], nn.Module], list[int]]:
    """A constructor of ``family`` at width multiplier ``width`` for ``split``, and its hidden widths."""
    if family == "mlp":
        in_features = int(np.prod(split.input_shape))
        return (lambda: MLP(in_features, hidden=(32, 32, 32), num_classes=split.num_classes,
                            width_multiplier=width)), [32 * width] * 3
    if len(split.input_shape) != 2:
        raise DataError(f"family {family!r} is a 1-D CNN for signals (N, C, L) such as mnist1d; {split.name} inputs "
                        f"have shape {split.input_shape}")
    norm = {"cnn-bn": "batch", "cnn-ln": "layer"}[family]
    return (lambda: ResNet1d(split.input_shape[0], width=8, num_classes=split.num_classes, width_multiplier=width,
                             norm=norm)), [8 * width, 16 * width, 32 * width]


def repaired_curve(model_a: Any, model_b: Any, test: Any, calibration: Any, steps: int,
                   num_batches: int | None) -> InterpolationCurve:
    """The interpolation curve with REPAIR at every point (endpoint statistics mixed ``1 - alpha : alpha``)."""
    alphas = np.linspace(0.0, 1.0, steps)
    losses, accuracies = [], []
    for alpha in alphas:
        point = interpolate(model_a, model_b, float(alpha))
        if 0.0 < alpha < 1.0:
            point = repair(point, [model_a, model_b], calibration, weights=[1.0 - alpha, alpha],
                           num_batches=num_batches, progress=False, inplace=True)
        result = evaluate(point, test)
        losses.append(result.loss)
        accuracies.append(result.accuracy)
    return InterpolationCurve.from_values(alphas, losses, accuracies)


def repair_reduction(barriers: dict[str, float], batch_norm: bool) -> dict[str, float]:
    """``1 - barrier(X + REPAIR) / barrier(X)`` per alignment X (X with BN reset for BatchNorm networks)."""
    out = {}
    for method in ALIGNMENTS:
        base = barriers[method + BN_RESET] if batch_norm else barriers[method]
        out[method] = 1.0 - barriers[method + REPAIR] / base if base > 0 else float("nan")
    return out


def width_row(run: common.Run, family: str, width: int, epochs: int, steps: int,
              num_batches: int | None) -> dict[str, Any]:
    """Train two networks of ``family`` at width ``width`` and measure every curve between them."""
    build, hidden = builder(family, run.split, width)
    model_a, model_b = run.members(build, 2, epochs, lr=1e-3 if family == "mlp" else 3e-3)
    batch_norm = family == "cnn-bn"
    calibration = list(itertools.islice(run.train, num_batches)) if num_batches else run.train
    endpoints = [evaluate(m, run.test) for m in (model_a, model_b)]
    curves: dict[str, InterpolationCurve] = {}
    for method in ALIGNMENTS:
        other = model_b if method == "naive" else align(model_a, model_b, run.example_inputs, method=method,
                                                        data=calibration, seed=run.args.seed, progress=False).model
        curves[method] = interpolation_curve(model_a, other, run.test, steps=steps, progress=False)
        if batch_norm:
            curves[method + BN_RESET] = interpolation_curve(model_a, other, run.test, steps=steps, reset_bn=True,
                                                            bn_data=calibration, progress=False)
        curves[method + REPAIR] = repaired_curve(model_a, other, run.test, calibration, steps, None)
    barriers = {k: c.barrier for k, c in curves.items()}
    row = {
        "family": family,
        "width_multiplier": width,
        "hidden": hidden,
        "endpoint_accuracy": [e.accuracy for e in endpoints],
        "barrier": barriers,
        "accuracy_barrier": {k: c.accuracy_barrier for k, c in curves.items()},
        "repair_reduction": repair_reduction(barriers, batch_norm),
        "curves": {k: c.to_dict() for k, c in curves.items()},
    }
    if run.progress:
        print(f"{family} x{width}: " + ", ".join(f"{k} {c.barrier:.3f}" for k, c in curves.items()), flush=True)
    return row


def plot_family(run: common.Run, family: str, rows: list[dict[str, Any]]) -> None:
    labels = list(rows[0]["barrier"])
    styles = {label: "--s" if REPAIR in label else (":^" if BN_RESET in label else "-o") for label in labels}
    x = [r["width_multiplier"] for r in rows]
    xlabel = "width multiplier m (hidden = 32 m)" if family == "mlp" else "width multiplier m (channels = 8 m, 16 m, 32 m)"
    common.line_plot(run.out / f"barrier_vs_width_{family}.png", [
        {"x": x, "series": {k: [r["barrier"][k] for r in rows] for k in labels}, "styles": styles, "logx": True,
         "xlabel": xlabel, "ylabel": "loss barrier", "title": "loss barrier"},
        {"x": x, "series": {k: [100 * r["accuracy_barrier"][k] for r in rows] for k in labels}, "styles": styles,
         "logx": True, "xlabel": xlabel, "ylabel": "accuracy barrier (%)", "title": "accuracy barrier"},
    ], title=f"Barrier between two {family} networks on {run.split.name}: naive vs aligned "
             f"(dashed: REPAIR, dotted: BN reset)")


def body(run: common.Run) -> dict[str, Any]:
    quick = run.args.quick
    families = run.args.families or (FAMILIES if run.split.name == "mnist1d" else ("mlp",))
    widths = run.args.widths or ((1, 2) if quick else (1, 2, 4, 8))
    steps = 5 if quick else 11
    rows = []
    budget = {}
    for family in families:
        mlp = family == "mlp"
        epochs = 5 if quick else (20 if mlp and run.split.name == "digits" else (40 if mlp else 10))
        num_batches = 4 if quick else (None if mlp else 8)  # calibration batches for alignment, BN reset and REPAIR
        budget[family] = {"epochs": epochs, "calibration_batches": num_batches}
        family_rows = []
        for width in widths:  # each finished width is kept in partial.json, for a run that is interrupted
            family_rows.append(width_row(run, family, width, epochs, steps, num_batches))
            save_json({"rows": rows + family_rows, "budget": budget}, run.out / "partial.json")
        plot_family(run, family, family_rows)
        rows += family_rows
    return {"experiment": NAME, "dataset": run.split.name, "families": list(families), "widths": list(widths),
            "budget": budget, "steps": steps, "rows": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment (see the module docstring) and return its results."""
    parser = common.parent_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", help="width multipliers (default 1 2 4 8; quick: 1 2)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES,
                        help="network families (default: mlp on digits, all on mnist1d)")
    return common.run_experiment(parser, body, argv)


if __name__ == "__main__":
    common.script_main(main)
