"""Experiment 03: the loss barrier between two MLPs against their width, naive and after alignment (Git Re-Basin).

Ainsworth, Hayase & Srinivasa (ICLR 2023), "Git Re-Basin": two networks trained from different seeds
are separated by a loss barrier on the straight line between them; after permuting one of them into
the other's basis the barrier shrinks, and it shrinks further as the networks get wider. Jordan et al.
(ICLR 2023), "REPAIR", restore the neuron statistics that interpolation collapses.

For each width multiplier, two MLPs (hidden ``32 x m`` three times) are trained on the data from
seeds ``seed`` and ``seed + 1``; model B is aligned to A by weight matching, activation matching and
optimal transport, and the interpolation curve is measured naive and after each alignment, each also
with REPAIR applied at every point (``fusion.repair`` with the endpoints weighted ``1 - alpha`` and
``alpha``). Outputs: ``results.json`` (all curves and barriers) and ``barrier_vs_width.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import excommon as common
import numpy as np

from fusion import align, evaluate, interpolate, interpolation_curve, repair
from fusion.analysis.interpolation import InterpolationCurve
from fusion.models import MLP

NAME = "ex03_rebasin_barriers"
ALIGNMENTS = ("naive", "weight", "activation", "ot")


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


def body(run: common.Run) -> dict[str, Any]:
    quick = run.args.quick
    widths = run.args.widths or ((1, 4) if quick else (1, 2, 4, 8))
    epochs = 5 if quick else 20
    steps = 5 if quick else 11
    num_batches = 4 if quick else None
    in_features = int(np.prod(run.split.input_shape))
    rows = []
    for width in widths:
        def build(width: int = width) -> MLP:
            return MLP(in_features, hidden=(32, 32, 32), num_classes=run.split.num_classes, width_multiplier=width)

        model_a, model_b = run.members(build, 2, epochs, lr=1e-3)
        endpoints = [evaluate(m, run.test) for m in (model_a, model_b)]
        curves: dict[str, InterpolationCurve] = {}
        for method in ALIGNMENTS:
            other = model_b if method == "naive" else align(model_a, model_b, run.example_inputs, method=method,
                                                            data=run.train, seed=run.args.seed,
                                                            progress=False).model
            curves[method] = interpolation_curve(model_a, other, run.test, steps=steps, progress=False)
            curves[f"{method} + REPAIR"] = repaired_curve(model_a, other, run.test, run.train, steps, num_batches)
        rows.append({
            "width_multiplier": width,
            "hidden": [32 * width] * 3,
            "endpoint_accuracy": [e.accuracy for e in endpoints],
            "barrier": {k: c.barrier for k, c in curves.items()},
            "accuracy_barrier": {k: c.accuracy_barrier for k, c in curves.items()},
            "curves": {k: c.to_dict() for k, c in curves.items()},
        })
        if run.progress:
            print(f"width x{width}: " + ", ".join(f"{k} {c.barrier:.3f}" for k, c in curves.items()), flush=True)
    labels = list(rows[0]["barrier"])
    styles = {label: "--s" if "REPAIR" in label else "-o" for label in labels}
    x = [r["width_multiplier"] for r in rows]
    common.line_plot(run.out / "barrier_vs_width.png", [
        {"x": x, "series": {k: [r["barrier"][k] for r in rows] for k in labels}, "styles": styles, "logx": True,
         "xlabel": "width multiplier (hidden = 32 x m)", "ylabel": "loss barrier", "title": "loss barrier"},
        {"x": x, "series": {k: [100 * r["accuracy_barrier"][k] for r in rows] for k in labels}, "styles": styles,
         "logx": True, "xlabel": "width multiplier (hidden = 32 x m)", "ylabel": "accuracy barrier (%)",
         "title": "accuracy barrier"},
    ], title=f"Barrier between two MLPs on {run.split.name}: naive vs aligned (dashed: with REPAIR)")
    return {"experiment": NAME, "widths": list(widths), "epochs": epochs, "steps": steps, "rows": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment (see the module docstring) and return its results."""
    parser = common.parent_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", help="width multipliers (default 1 2 4 8; quick: 1 4)")
    return common.run_experiment(parser, body, argv)


if __name__ == "__main__":
    common.script_main(main)
