"""Experiment 02: a Neuron Transplantation study: step order, ensemble size, member diversity, recovery, all methods.

Öz, Debus & Götz (ECML PKDD 2024), "Model Fusion via Neuron Transplantation": the members of an
ensemble are concatenated into one wide model (the exact output ensemble), pruned back to the members'
width by keeping the largest neurons (``fusion.fuse_ensemble``), then fine-tuned. Pruning sacrifices the
small neurons (a loss right after fusion); fine-tuning recovers, and the transplanted neurons make the
fused model better than its members when the members are diverse.

Members are trained on the data from seeds ``seed``, ``seed + 1``, ... (different initialisations and data
orders; the *similar* members share the initialisation of ``seed`` and differ only in data order): MLPs
(128-128 on digits; 40-256-256-10 on mnist1d, as in the mnist1d paper) and, on mnist1d, also the 1-D
residual CNN :class:`fusion.models.ResNet1d` with BatchNorm (``--families``). Every fused model and
the best member get the same fine-tuning budget (``finetune_epochs`` of Adam at lr 1e-3: 2 on digits,
20 for mnist1d MLPs, 5 for mnist1d CNNs). Parts, per family:

1. ``order``: merge -> prune -> fine-tune (Neuron Transplantation) against prune -> merge -> fine-tune
   (each member pruned to ``1/N`` of its width by torch-pruning, then concatenated) and
   merge -> fine-tune -> prune -> fine-tune (the wide model is fine-tuned before pruning);
2. ``count``: fusing 2, 4 and 8 members (quick: 2 and 4) with NT, vanilla averaging, weight-matching merge
   and OT fusion, one-shot and fine-tuned, next to the best member (also fine-tuned) and the ensemble;
   ``verdict`` says per count whether NT + fine-tuning beats the best member given the same budget;
3. ``diversity``: similar against diverse members;
4. ``recovery``: the test loss during fine-tuning (``finetune_with_history``) of the transplanted, the
   averaged and the merged model and of the best member: the "sacrifice, then recover" curve;
5. ``methods``: every fusion method next to the best member and the ensemble, one-shot and fine-tuned
   with the same budget, with time and peak memory (``fusion.demo.compare_methods``).

Outputs: ``results.json`` (per family), ``methods_<family>.txt`` and the plots ``count_<family>.png`` and
``recovery_<family>.png``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import excommon as common
import numpy as np
import torch_pruning as tp
from torch import nn
from torch.nn.modules.conv import _ConvNd

from fusion import concat_models, ensemble_evaluate, evaluate, fuse_ensemble, merge
from fusion.analysis.io import save_json
from fusion.demo import FUSION_METHODS, compare_methods, format_table, fuse_models
from fusion.errors import DataError
from fusion.fuse import finetune, finetune_with_history
from fusion.models import MLP, ResNet1d

NAME = "ex02_transplantation"
FAMILIES = ("mlp", "cnn")
METHODS = ("transplant", "average", "merge", "ot")


def hidden_widths(model: nn.Module) -> list[int]:
    """Output widths of the Linear and convolution layers, the output layer excluded."""
    return [m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in model.modules()
            if isinstance(m, (nn.Linear, _ConvNd))][:-1]


def prune_to(model: nn.Module, example_inputs: Any, keep: float) -> nn.Module:
    """A copy of ``model`` with every hidden layer pruned to ``keep`` of its width (largest L2 neurons kept)."""
    pruned = copy.deepcopy(model)
    output = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(pruned, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=1.0 - keep, ignored_layers=[output])
    pruner.step()
    return pruned


def scores(model: nn.Module, test: Any) -> dict[str, float]:
    result = evaluate(model, test)
    return {"accuracy": result.accuracy, "loss": result.loss}


def order_study(run: common.Run, members: list[nn.Module], epochs: int) -> dict[str, Any]:
    """The three orders of merging (concatenation), pruning and fine-tuning, each ending with ``epochs`` of tuning."""
    keep = 1.0 / len(members)
    tune = dict(epochs=epochs, lr=1e-3, seed=run.args.seed, progress=False)
    wide = concat_models(members, run.example_inputs)
    variants = {
        "merge -> prune -> ft (NT)": fuse_ensemble(members, run.example_inputs, progress=False),
        "prune -> merge -> ft": concat_models([prune_to(m, run.example_inputs, keep) for m in members],
                                              run.example_inputs),
        "merge -> ft -> prune -> ft": prune_to(finetune(wide, run.train, **tune), run.example_inputs, keep),
    }
    out = {"wide (concatenated) model": scores(wide, run.test)}
    for name, model in variants.items():
        tuned = finetune(model, run.train, **tune)
        out[name] = {"before_ft": scores(model, run.test), "after_ft": scores(tuned, run.test),
                     "hidden": hidden_widths(model)}
    return out


def fused_scores(run: common.Run, members: list[nn.Module], epochs: int) -> dict[str, Any]:
    """One-shot and fine-tuned scores of NT, averaging, merging and OT, and the baselines, for one ensemble."""
    best = max(members, key=lambda m: evaluate(m, run.test).accuracy)
    ensemble = ensemble_evaluate(members, run.test)
    out: dict[str, Any] = {"ensemble": {"accuracy": ensemble.accuracy, "loss": ensemble.loss},
                           "best member": {"before_ft": scores(best, run.test)}}
    fused = {"best member": best}
    for method in METHODS:
        fused[method] = fuse_models(method, members, run.example_inputs, run.train, progress=False, seed=run.args.seed)
        out[method] = {"before_ft": scores(fused[method], run.test)}
    for method, model in fused.items():
        tuned = finetune(model, run.train, epochs=epochs, lr=1e-3, seed=run.args.seed, progress=False)
        out[method]["after_ft"] = scores(tuned, run.test)
    return out


def recovery_study(run: common.Run, members: list[nn.Module], epochs: int, family: str) -> dict[str, Any]:
    """Test loss every few steps while fine-tuning the fused models and the best member."""
    best = max(members, key=lambda m: evaluate(m, run.test).accuracy)
    models = {
        "neuron transplantation": fuse_ensemble(members, run.example_inputs, progress=False),
        "vanilla average": fuse_models("average", members, run.example_inputs, run.train, progress=False),
        "weight-matching merge": merge(members, example_inputs=run.example_inputs, seed=run.args.seed, progress=False),
        "best member": best,
    }
    every = max(1, len(run.train) // 4)
    curves = {}
    for label, model in models.items():
        history = finetune_with_history(model, run.train, epochs=epochs, lr=1e-3, seed=run.args.seed, progress=False,
                                        eval_data=run.test, eval_every=every).history
        curves[label] = {"step": [r.step for r in history], "loss": [r.eval_loss for r in history],
                         "accuracy": [r.eval_accuracy for r in history]}
    ensemble = ensemble_evaluate(members, run.test)
    scale = {"loss": 1.0, "accuracy": 100.0}
    panels = [
        {"xy": {label: (c["step"], [scale[key] * v for v in c[key]]) for label, c in curves.items()},
         "xlabel": "fine-tuning step", "ylabel": name, "title": f"test {name} during fine-tuning (ensemble: "
         f"{ensemble.loss:.3f} loss, {100 * ensemble.accuracy:.1f}%)"}
        for key, name in (("loss", "loss"), ("accuracy", "accuracy (%)"))
    ]
    common.line_plot(run.out / f"recovery_{family}.png", panels,
                     title=f"Sacrifice, then recover: fine-tuning fused {family} models on {run.split.name}")
    return {"eval_every": every, "ensemble": {"accuracy": ensemble.accuracy, "loss": ensemble.loss}, "curves": curves}


def verdict(count: dict[str, Any]) -> dict[str, Any]:
    """Does NT + fine-tuning beat the best member fine-tuned with the same budget (and the ensemble)?"""
    nt, best = count["transplant"]["after_ft"]["accuracy"], count["best member"]["after_ft"]["accuracy"]
    return {"nt_ft": nt, "best_member": count["best member"]["before_ft"]["accuracy"], "best_member_ft": best,
            "ensemble": count["ensemble"]["accuracy"], "nt_ft_minus_best_member_ft": nt - best,
            "nt_ft_beats_best_member_ft": nt > best}


def family_settings(family: str, split: Any, quick: bool) -> dict[str, Any]:
    """Model constructor and training budget of one family on ``split`` (mnist1d gets the larger budgets)."""
    mnist1d = split.name == "mnist1d"
    if family == "mlp":
        hidden = (64, 64) if quick else ((256, 256) if mnist1d else (128, 128))
        in_features = int(np.prod(split.input_shape))
        epochs, ft_epochs = (3, 1) if quick else ((40, 20) if mnist1d else (10, 2))
        return {"build": lambda: MLP(in_features, hidden=hidden, num_classes=split.num_classes), "lr": 1e-3,
                "epochs": epochs, "finetune_epochs": ft_epochs, "architecture": f"MLP {list(hidden)}"}
    width = 8 if quick else 16
    epochs, ft_epochs = (2, 1) if quick else (10, 5)
    return {"build": lambda: ResNet1d(split.input_shape[0], width=width, num_classes=split.num_classes), "lr": 3e-3,
            "epochs": epochs, "finetune_epochs": ft_epochs, "architecture": f"ResNet1d width {width}, BatchNorm"}


def family_study(run: common.Run, family: str) -> dict[str, Any]:
    quick = run.args.quick
    settings = family_settings(family, run.split, quick)
    ft_epochs = settings["finetune_epochs"]
    counts = (2, 4) if quick else (2, 4, 8)
    diverse = run.members(settings["build"], max(counts), settings["epochs"], lr=settings["lr"])
    similar = run.members(settings["build"], 2, settings["epochs"], lr=settings["lr"], same_init=True, offset=100)
    pair = diverse[:2]
    results: dict[str, Any] = {"architecture": settings["architecture"], "epochs": settings["epochs"],
                               "finetune_epochs": ft_epochs,
                               "member_accuracy": [evaluate(m, run.test).accuracy for m in diverse]}
    results["order"] = order_study(run, pair, ft_epochs)
    results["count"] = {str(k): fused_scores(run, diverse[:k], ft_epochs) for k in counts}
    results["verdict"] = {str(k): verdict(results["count"][str(k)]) for k in counts}
    results["diversity"] = {"similar (same init)": fused_scores(run, similar, ft_epochs),
                            "diverse (different seeds)": results["count"]["2"]}
    results["recovery"] = recovery_study(run, pair, ft_epochs, family)
    rows = compare_methods(pair, run.example_inputs, run.train, run.test, finetune_methods=("best member",
                           *FUSION_METHODS), finetune_epochs=ft_epochs, family=family.upper(), progress=False,
                           seed=run.args.seed)
    results["methods"] = [r.to_dict() for r in rows]
    common.write_table(run.out / f"methods_{family}.txt", format_table(rows))
    series = {}
    for method in (*METHODS, "best member"):
        series[f"{method} one-shot"] = [100 * results["count"][str(k)][method]["before_ft"]["accuracy"] for k in counts]
        series[f"{method} + ft"] = [100 * results["count"][str(k)][method]["after_ft"]["accuracy"] for k in counts]
    series["ensemble"] = [100 * results["count"][str(k)]["ensemble"]["accuracy"] for k in counts]
    styles = {label: "--s" if "one-shot" in label else "-o" for label in series}
    common.line_plot(run.out / f"count_{family}.png", [{"x": list(counts), "series": series, "styles": styles,
                                                        "logx": True, "xlabel": "number of fused models",
                                                        "ylabel": "test accuracy (%)"}],
                     title=f"Fusing more {settings['architecture']} models on {run.split.name} "
                           f"(dashed: before fine-tuning; ft = {ft_epochs} epochs)", width=8.0)
    if run.progress:
        print(format_table(rows), flush=True)
    return results


def body(run: common.Run) -> dict[str, Any]:
    families = run.args.families or (FAMILIES if run.split.name == "mnist1d" else ("mlp",))
    if "cnn" in families and len(run.split.input_shape) != 2:
        raise DataError(f"family 'cnn' is a 1-D CNN for signals (N, C, L) such as mnist1d; {run.split.name} inputs "
                        f"have shape {run.split.input_shape}")
    results: dict[str, Any] = {"experiment": NAME, "dataset": run.split.name, "families": {}}
    for family in families:  # each finished family is kept in partial.json, for a run that is interrupted
        results["families"][family] = family_study(run, family)
        save_json(results, run.out / "partial.json")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment (see the module docstring) and return its results."""
    parser = common.parent_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES,
                        help="member families (default: mlp on digits, mlp and cnn on mnist1d)")
    return common.run_experiment(parser, body, argv)


if __name__ == "__main__":
    common.script_main(main)
