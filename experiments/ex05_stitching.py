"""Experiment 05: model stitching and CKA by depth between two digits models, raw, aligned and fused.

Model stitching (Lenc & Vedaldi 2015; Bansal, Nakkiran & Barak 2021) runs model A up to a layer,
maps its representation with a small stitching layer and finishes in model B; if the stitched model
stays accurate, B can use A's representation. Linear CKA (Kornblith et al. 2019) compares the
representations directly and is invariant to permutations of the units.

Two VGG-style models (``fusion.models.VGGSmall``, digits upsampled to 16x16) are trained from seeds
``seed`` and ``seed + 1``; B is aligned to A by weight matching, and A and B are merged (weight
matching + BatchNorm reset). At every cut point of the network (``fusion.inspect.cut_points``) the
experiment measures

* the test accuracy of A -> B stitched with a fitted linear and a fitted Procrustes layer;
* the accuracy of the identity stitch (A's units fed straight into B) before and after alignment:
  only the aligned B can read A's units as they are;
* linear CKA between A and B, A and aligned B (equal: CKA ignores permutations) and A and the merged model.

Outputs: ``results.json`` and ``stitching_by_depth.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import excommon as common
from torch import nn

from fusion import align, evaluate, fit_stitch, linear_cka, merge, stitch
from fusion.inspect import cut_points
from fusion.models import VGGSmall

NAME = "ex05_stitching"


def stitch_depths(model: nn.Module) -> list[str]:
    """Leaf modules whose output cuts the model in two, except the output layer."""
    modules = dict(model.named_modules())
    leaves = [name for name in cut_points(model) if not any(True for _ in modules[name].children())]
    return leaves[:-1]


def stitched_accuracy(model_a: nn.Module, model_b: nn.Module, layer: str, run: common.Run, kind: str | None) -> float:
    """Test accuracy of A -> B stitched at ``layer``: fitted ``kind`` stitch, or the identity stitch for None."""
    stitched = stitch(model_a, layer, model_b, layer, run.example_inputs, stitch=kind or "linear")
    if kind is not None:
        stitched = fit_stitch(stitched, run.train, progress=False, inplace=True)
    return evaluate(stitched, run.test).accuracy


def body(run: common.Run) -> dict[str, Any]:
    quick = run.args.quick
    epochs = 2 if quick else 8
    channels = run.split.input_shape[0]

    def build() -> VGGSmall:
        return VGGSmall(in_channels=channels, widths=(16, 32, 64), hidden=(64,), num_classes=run.split.num_classes)

    model_a, model_b = run.members(build, 2, epochs, lr=3e-3)
    aligned = align(model_a, model_b, run.example_inputs, method="weight", seed=run.args.seed, progress=False).model
    merged = merge([model_a, model_b], data=run.train, example_inputs=run.example_inputs, reset_bn=True,
                   seed=run.args.seed, progress=False)
    depths = stitch_depths(model_a)
    if quick:
        depths = depths[:: max(1, len(depths) // 5)]
    cka = {label: linear_cka(model_a, other, run.test, depths).values
           for label, other in (("A vs B", model_b), ("A vs aligned B", aligned), ("A vs merged", merged))}
    rows = []
    for k, layer in enumerate(depths):
        row = {
            "layer": layer,
            "depth": k,
            "stitch_linear": stitched_accuracy(model_a, model_b, layer, run, "linear"),
            "stitch_procrustes": stitched_accuracy(model_a, model_b, layer, run, "procrustes"),
            "identity_unaligned": stitched_accuracy(model_a, model_b, layer, run, None),
            "identity_aligned": stitched_accuracy(model_a, aligned, layer, run, None),
            "cka": {label: values[k] for label, values in cka.items()},
        }
        rows.append(row)
        if run.progress:
            print(f"{layer:>14}: linear {row['stitch_linear']:.3f}  identity raw {row['identity_unaligned']:.3f} "
                  f"aligned {row['identity_aligned']:.3f}  CKA {row['cka']['A vs B']:.3f}", flush=True)
    endpoints = {"A": evaluate(model_a, run.test).accuracy, "B": evaluate(model_b, run.test).accuracy,
                 "merged": evaluate(merged, run.test).accuracy}
    x = list(range(len(rows)))
    accuracy_series = {
        "fitted linear stitch A -> B": [100 * r["stitch_linear"] for r in rows],
        "fitted Procrustes stitch A -> B": [100 * r["stitch_procrustes"] for r in rows],
        "identity stitch A -> B": [100 * r["identity_unaligned"] for r in rows],
        "identity stitch A -> aligned B": [100 * r["identity_aligned"] for r in rows],
    }
    common.line_plot(run.out / "stitching_by_depth.png", [
        {"x": x, "series": accuracy_series, "xlabel": f"stitch depth (0 = {rows[0]['layer']}, "
         f"{len(rows) - 1} = {rows[-1]['layer']})", "ylabel": "test accuracy (%)", "title": "stitched accuracy"},
        {"x": x, "series": {label: list(values) for label, values in cka.items()},
         "styles": {"A vs aligned B": "--x"}, "xlabel": "depth", "ylabel": "linear CKA", "title": "CKA by depth"},
    ], title=f"Stitching VGGSmall models on {run.split.name}")
    return {"experiment": NAME, "epochs": epochs, "endpoint_accuracy": endpoints, "rows": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment (see the module docstring) and return its results."""
    parser = common.parent_parser(NAME, __doc__.splitlines()[0])
    return common.run_experiment(parser, body, argv, image_size=16)


if __name__ == "__main__":
    common.script_main(main)
