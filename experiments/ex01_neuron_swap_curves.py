"""Experiment 01: neuron-swap mode connectivity: is the path between a network and its 2-neuron swap local or global?

Swapping two neurons of a layer (and the weights that read them) gives a network that computes exactly
the same function at another point of weight space. A Bézier curve (Garipov et al. 2018) trained from
the original to the swapped network shows how the loss landscape connects the two: if only the
swapped layer moves along the curve the correction is *local*; if every layer moves, *global*.

A VGG-style model (``fusion.models.VGGSmall``, digits upsampled to 16x16) is trained from ``seed``; on
mnist1d the 1-D residual CNN ``fusion.models.ResNet1d`` (width 16, BatchNorm). For
an early, a middle and a late convolution (``fusion.neuronswap.layer_at_depth``, as ``fusion swap --depth``:
block 0 layer 0, layer 1 of the middle block, layer 1 of the last block; VGGSmall's blocks hold one
convolution each) two random units are swapped (``fusion.swap_neurons``), the
swap is checked to preserve the function on the test set (``fusion.verify_equivalence``), and a curve
with one trained control point is fitted from the original to the swapped model, then evaluated at 61
points (loss, accuracy and the distance of every layer from the original under all three metrics).

Outputs per depth, in ``<depth>2/`` (as in the original experiment's layout): the swapped checkpoint and
its ``checkpoint_metadata.json``, ``layer_distances_along_curve.npz``, ``analysis_summary.json``,
``layer_distances_evolution_heatmap.png`` and ``layer_distances_evolution.gif`` (the layers the swap
touches in red); and ``results.json`` with, per depth, the barriers of the straight line and of the
curve and the *locality*: the share of the curve's squared displacement at t = 0.5 that lies in the
layers the swap touched (1.0 = purely local correction).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import excommon as common
import numpy as np
import torch

from fusion import (
    animate_layer_distances,
    evaluate,
    evaluate_curve,
    interpolation_curve,
    permutation_spec,
    plot_distance_heatmap,
    swap_neurons,
    train_bezier_curve,
    verify_equivalence,
)
from fusion.analysis.io import save_json
from fusion.checkpoint import save_model
from fusion.models import ResNet1d, VGGSmall
from fusion.neuronswap import DEPTHS, layer_at_depth

NAME = "ex01_neuron_swap_curves"


def touched_modules(group: Any) -> list[str]:
    """Module names of the tensors a permutation of ``group`` moves (producer, its norm, the consumers)."""
    return list(dict.fromkeys(member.name.rsplit(".", 1)[0] for member in group.members))


def locality(evaluation: Any, touched: Sequence[str]) -> float:
    """Share of the squared raw displacement from the original at the curve's midpoint lying in ``touched``."""
    middle = int(np.argmin(np.abs(evaluation.t - 0.5)))
    squared = evaluation.raw_l2[middle] ** 2
    total = float(squared.sum())
    inside = float(sum(squared[k] for k, name in enumerate(evaluation.names) if name in touched))
    return inside / total if total > 0 else float("nan")


def body(run: common.Run) -> dict[str, Any]:
    quick = run.args.quick
    epochs, curve_epochs, points = (2, 1, 11) if quick else (10, 10, 61)
    calibration = list(itertools.islice(run.train, 4)) if quick else run.train  # BatchNorm statistics at each point
    channels = run.split.input_shape[0]

    def build() -> torch.nn.Module:
        if len(run.split.input_shape) == 2:  # signals (C, L): mnist1d
            return ResNet1d(channels, width=16, num_classes=run.split.num_classes)
        return VGGSmall(in_channels=channels, widths=(16, 32, 64), hidden=(64,), num_classes=run.split.num_classes)

    (original,) = run.members(build, 1, epochs, lr=3e-3)
    save_model(original, run.out / "original" / "checkpoint.pt")
    spec = permutation_spec(original, run.example_inputs)
    layers = {depth: layer_at_depth(original, depth, run.example_inputs, spec) for depth in DEPTHS}
    test_inputs = torch.cat([x for x, _ in run.test])
    baseline = evaluate(original, run.test)
    generator = torch.Generator().manual_seed(run.args.seed)
    depths = {}
    for depth, layer in layers.items():
        folder = run.out / f"{depth}2"
        group = spec.group_of_layer(layer)
        i, j = (int(k) for k in torch.randperm(group.size, generator=generator)[:2])
        swapped = swap_neurons(original, layer, i, j, spec=spec)
        difference = verify_equivalence(original, swapped, test_inputs)
        touched = touched_modules(group)
        metadata = {"depth": depth, "layer": layer, "group": group.name, "group_size": group.size, "neurons": [i, j],
                    "tensors_moved": [m.name for m in group.members], "modules_touched": touched,
                    "verification": {"max_relative_difference": difference, "num_inputs": int(test_inputs.shape[0])},
                    "seed": run.args.seed}
        save_model(swapped, folder / "checkpoint.pt")
        save_json(metadata, folder / "checkpoint_metadata.json")
        line = interpolation_curve(original, swapped, run.test, steps=points, reset_bn=True, bn_data=calibration,
                                   progress=False)
        curve = train_bezier_curve(original, swapped, run.train, epochs=curve_epochs, lr=0.01, seed=run.args.seed,
                                   progress=run.progress)
        evaluation = evaluate_curve(curve, run.test, num_points=points, bn_data=calibration, reference=original,
                                    progress=run.progress)
        evaluation.save(folder / "layer_distances_along_curve.npz", metadata=metadata)
        plot_distance_heatmap(evaluation, folder / "layer_distances_evolution_heatmap.png", highlight=touched,
                              title=f"{depth} swap of units {i}, {j} in {layer}: normalized L2 from the original")
        animate_layer_distances(evaluation, folder / "layer_distances_evolution.gif", fps=10, highlight=touched,
                                title=f"{depth} swap ({layer})")
        summary = evaluation.summary()
        depths[depth] = {
            **metadata,
            "straight_line": {"barrier": line.barrier, "accuracy_barrier": line.accuracy_barrier,
                              "midpoint_accuracy": float(line.accuracy[len(line.accuracy) // 2])},
            "curve": {"barrier": evaluation.barrier, "accuracy_barrier": evaluation.accuracy_barrier,
                      "min_accuracy": summary["accuracy"]["min"]},
            "locality_at_midpoint": locality(evaluation, touched),
            "most_moved_layer": summary["most_moved_layer"],
        }
        if run.progress:
            print(f"{depth} ({layer}, units {i} and {j}): equivalence {difference:.1e}; straight-line barrier "
                  f"{line.barrier:.4f}, curve barrier {evaluation.barrier:.4f}; locality "
                  f"{depths[depth]['locality_at_midpoint']:.3f}", flush=True)
    return {"experiment": NAME, "epochs": epochs, "curve_epochs": curve_epochs, "num_points": points,
            "original": {"accuracy": baseline.accuracy, "loss": baseline.loss}, "depths": depths}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment (see the module docstring) and return its results."""
    parser = common.parent_parser(NAME, __doc__.splitlines()[0])
    return common.run_experiment(parser, body, argv, image_size=16)


if __name__ == "__main__":
    common.script_main(main)
