"""The `fusion demo`: train small models on the embedded digits, align them, fuse them every way, compare.

Also the small workbench the command line and the numbered experiments share with the demo:

* :func:`train_models`: several seeded models of one architecture trained on a :class:`~fusion.data.DataSplit`;
* :data:`FUSION_METHODS` / :func:`fuse_models`: every fusion method of the toolkit under one name
  (vanilla averaging, weight-matching merge, merge + REPAIR, OT fusion, Neuron Transplantation);
* :func:`compare_methods`: accuracy, loss, time and peak memory of each method next to the best
  member and the output ensemble (the baselines of Singh & Jaggi 2020 and Öz et al. 2024);
* :func:`alignment_curves`: the interpolation curve between two models, naive and after each alignment
  (Ainsworth et al. 2023, "Git Re-Basin");
* :func:`measure`: wall time and peak resident memory of a call.

Models with BatchNorm get their running statistics recomputed on the training data after averaging
(vanilla, merge, OT), since averaged statistics describe no network (Jordan et al. 2023, "REPAIR").

Example:
    >>> result = run_demo("results/demo", quick=True, progress=False)  # doctest: +SKIP
    >>> print(format_table(result.rows))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .align import align
from .analysis.interpolation import InterpolationCurve, has_batch_norm, interpolation_curve
from .analysis.io import save_json, write_text
from .analysis.plots import plot_interpolation
from .data import DataSplit, example_batch, get_data, make_loaders
from .errors import DataError, EnsembleError
from .evaluate import ensemble_evaluate, evaluate
from .fuse import average, finetune, fuse_ensemble, merge, ot_fusion, reset_bn_stats, train_model
from .models import MLP, SmallResNet
from .progress import tqdm

__all__ = [
    "FUSION_METHODS",
    "METHOD_LABELS",
    "DemoBudget",
    "DemoResult",
    "Measurement",
    "MethodResult",
    "alignment_curves",
    "compare_methods",
    "format_barriers",
    "format_table",
    "fuse_models",
    "measure",
    "run_demo",
    "train_models",
]

PathLike = str | os.PathLike

# --------------------------------------------------------------------------------------------
# Measuring time and memory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """Cost of one call.

    Attributes:
        seconds: wall-clock time.
        peak_memory_mb: peak resident memory of the process during the call minus the resident
            memory when it started (MiB), sampled every millisecond from ``/proc/self/statm``; where
            that file does not exist, the growth of the process's peak RSS (``getrusage``), which is 0
            if the call stayed below an earlier peak.
    """

    seconds: float
    peak_memory_mb: float


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


class _PeakSampler:
    """Samples the resident memory in a background thread while a call runs."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.start = _resident_bytes()
        self.peak = self.start or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            current = _resident_bytes()
            if current is not None and current > self.peak:
                self.peak = current

    def __enter__(self) -> _PeakSampler:
        self._rusage_start = _max_rss_bytes()
        if self.start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.start is not None:
            self._stop.set()
            self._thread.join()
            current = _resident_bytes()
            self.peak = max(self.peak, current or 0)

    @property
    def growth_mb(self) -> float:
        grown = self.peak - self.start if self.start is not None else _max_rss_bytes() - self._rusage_start
        return max(grown, 0) / 2**20


def measure(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Measurement]:
    """Call ``fn(*args, **kwargs)`` and return its result with its :class:`Measurement`."""
    with _PeakSampler() as sampler:
        started = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds = time.perf_counter() - started
    return value, Measurement(seconds, sampler.growth_mb)


# --------------------------------------------------------------------------------------------
# Training and fusing
# --------------------------------------------------------------------------------------------


def train_models(
    build: Callable[[], nn.Module],
    split: DataSplit,
    seeds: Sequence[int],
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    init_seeds: Sequence[int] | None = None,
    progress: bool = True,
) -> list[nn.Module]:
    """Train one model per seed: ``build()`` under the seed, then Adam on ``split.train``.

    Args:
        build: returns a fresh, untrained model (called with the global RNG seeded, then restored).
        split: the data; each model sees the training set in an order shuffled by its seed.
        seeds: one seed per model, for the data order (and the initialisation unless ``init_seeds``).
        epochs: training epochs.
        lr: Adam learning rate.
        batch_size: training batch size.
        init_seeds: seeds of the initialisations, one per model (e.g. all equal, for members that
            share their initialisation but not their data order); default ``seeds``.
        progress: show progress bars.

    Returns:
        The trained models, in eval mode, in the order of ``seeds``.
    """
    seeds = list(seeds)
    init_seeds = seeds if init_seeds is None else list(init_seeds)
    if len(init_seeds) != len(seeds):
        raise DataError(f"init_seeds has {len(init_seeds)} entries but seeds has {len(seeds)}")
    models = []
    for seed, init in zip(seeds, init_seeds):
        with torch.random.fork_rng():
            torch.manual_seed(init)
            model = build()
        loader, _ = make_loaders(split, batch_size=batch_size, seed=seed)
        trained = train_model(model, loader, epochs=epochs, lr=lr, seed=seed, progress=progress, inplace=True)
        models.append(trained.eval())
    return models


def _reset_if_bn(model: nn.Module, data: Any, progress: bool) -> nn.Module:
    if data is not None and has_batch_norm(model):
        return reset_bn_stats(model, data, progress=progress, inplace=True)
    return model


def _average(models: list[nn.Module], example_inputs: Any, data: Any, progress: bool, seed: int) -> nn.Module:
    return _reset_if_bn(average(models), data, progress)


def _merge(models: list[nn.Module], example_inputs: Any, data: Any, progress: bool, seed: int) -> nn.Module:
    reset = data is not None and has_batch_norm(models[0])
    return merge(models, method="weight", data=data, example_inputs=example_inputs, reset_bn=reset, seed=seed,
                 progress=progress)


def _merge_repair(models: list[nn.Module], example_inputs: Any, data: Any, progress: bool, seed: int) -> nn.Module:
    if data is None:
        raise DataError("merge-repair needs calibration data")
    return merge(models, method="weight", data=data, example_inputs=example_inputs, repair=True, seed=seed,
                 progress=progress)


def _ot(models: list[nn.Module], example_inputs: Any, data: Any, progress: bool, seed: int) -> nn.Module:
    reset = data is not None and has_batch_norm(models[0])
    return ot_fusion(models, example_inputs, data=data, reset_bn=reset, progress=progress)


def _transplant(models: list[nn.Module], example_inputs: Any, data: Any, progress: bool, seed: int) -> nn.Module:
    return fuse_ensemble(models, example_inputs, progress=progress, data=data)  # data: BatchNorm re-estimated


#: Fusion methods by name: ``fn(models, example_inputs, data, progress, seed) -> fused model``.
FUSION_METHODS: dict[str, Callable[[list[nn.Module], Any, Any, bool, int], nn.Module]] = {
    "average": _average,
    "merge": _merge,
    "merge-repair": _merge_repair,
    "ot": _ot,
    "transplant": _transplant,
}

#: Names printed in tables.
METHOD_LABELS: dict[str, str] = {
    "best member": "best member",
    "ensemble": "output ensemble",
    "average": "vanilla average",
    "merge": "weight-matching merge",
    "merge-repair": "merge + REPAIR",
    "ot": "OT fusion",
    "transplant": "neuron transplantation",
}


def fuse_models(
    method: str,
    models: Sequence[nn.Module],
    example_inputs: Any,
    data: Any = None,
    progress: bool = True,
    seed: int = 0,
) -> nn.Module:
    """Fuse ``models`` into one model with the named method of :data:`FUSION_METHODS`.

    Args:
        method: ``"average"``, ``"merge"`` (weight matching), ``"merge-repair"``, ``"ot"`` or ``"transplant"``.
        models: two or more models of one architecture (never modified).
        example_inputs: a batch the models accept, for tracing.
        data: training batches: calibration for BatchNorm reset and REPAIR (required by ``"merge-repair"``).
        progress: show progress bars.
        seed: seed of the alignment's sweep order.

    Returns:
        The fused model.

    Raises:
        EnsembleError: unknown method (the message lists the known ones).
    """
    if method not in FUSION_METHODS:
        raise EnsembleError(f"unknown fusion method {method!r}; choose one of {', '.join(FUSION_METHODS)}")
    return FUSION_METHODS[method](list(models), example_inputs, data, progress, seed)


@dataclass(frozen=True)
class MethodResult:
    """One row of a comparison: a fused (or baseline) model's test loss and accuracy, and its cost.

    Attributes:
        family: the architecture's label (e.g. ``"MLP"``).
        method: a key of :data:`METHOD_LABELS`, with ``" + ft"`` for a fine-tuned model.
        accuracy: test accuracy in [0, 1].
        loss: mean test cross-entropy.
        seconds: time to produce the model (fusion, plus fine-tuning for ``+ ft`` rows; 0 for baselines).
        peak_memory_mb: peak resident-memory growth while producing it (MiB).
    """

    family: str
    method: str
    accuracy: float
    loss: float
    seconds: float = 0.0
    peak_memory_mb: float = 0.0

    @property
    def label(self) -> str:
        base, plus, rest = self.method.partition(" + ")
        return METHOD_LABELS.get(base, base) + (plus + rest if plus else "")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


def compare_methods(
    models: Sequence[nn.Module],
    example_inputs: Any,
    train_data: Any,
    test_data: Any,
    methods: Sequence[str] = tuple(FUSION_METHODS),
    finetune_methods: Sequence[str] = (),
    finetune_epochs: int = 1,
    lr: float = 1e-3,
    family: str = "",
    progress: bool = True,
    seed: int = 0,
) -> list[MethodResult]:
    """Fuse ``models`` with each method and evaluate the results next to the baselines.

    Rows, in order: ``best member`` (the member with the highest test accuracy), ``ensemble`` (the mean
    of the members' logits), one row per ``methods`` entry, then one ``"<method> + ft"`` row per
    ``finetune_methods`` entry (``"best member"`` allowed): that model fine-tuned for ``finetune_epochs``
    on ``train_data`` (the same budget for every method).

    Args:
        models: two or more trained models of one architecture.
        example_inputs: a batch for tracing.
        train_data: training batches (calibration and fine-tuning).
        test_data: evaluation batches.
        methods: keys of :data:`FUSION_METHODS`.
        finetune_methods: which of ``methods`` (or ``"best member"``) to also fine-tune.
        finetune_epochs: fine-tuning epochs.
        lr: fine-tuning learning rate (Adam).
        family: label stored in the rows.
        progress: show progress bars.
        seed: seed of alignments and fine-tuning.

    Returns:
        One :class:`MethodResult` per row.
    """
    unknown = [m for m in [*methods, *finetune_methods] if m not in FUSION_METHODS and m != "best member"]
    if unknown:
        raise EnsembleError(f"unknown fusion method(s) {unknown}; choose from {', '.join(FUSION_METHODS)}")
    models = list(models)
    member_scores = [evaluate(m, test_data) for m in models]
    best = max(range(len(models)), key=lambda k: member_scores[k].accuracy)
    ensemble = ensemble_evaluate(models, test_data)
    rows = [
        MethodResult(family, "best member", member_scores[best].accuracy, member_scores[best].loss),
        MethodResult(family, "ensemble", ensemble.accuracy, ensemble.loss),
    ]
    fused: dict[str, tuple[nn.Module, Measurement]] = {"best member": (models[best], Measurement(0.0, 0.0))}
    for method in tqdm(methods, desc=f"fuse {family}".strip(), disable=not progress, leave=False):
        model, cost = measure(fuse_models, method, models, example_inputs, train_data, False, seed)
        fused[method] = (model, cost)
        result = evaluate(model, test_data)
        rows.append(MethodResult(family, method, result.accuracy, result.loss, cost.seconds, cost.peak_memory_mb))
    for method in finetune_methods:
        if method not in fused:
            fused[method] = measure(fuse_models, method, models, example_inputs, train_data, False, seed)
        model, cost = fused[method]
        tuned, tuning = measure(finetune, model, train_data, epochs=finetune_epochs, lr=lr, seed=seed, progress=False)
        result = evaluate(tuned, test_data)
        rows.append(MethodResult(family, f"{method} + ft", result.accuracy, result.loss, cost.seconds + tuning.seconds,
                                 max(cost.peak_memory_mb, tuning.peak_memory_mb)))
    return rows


def alignment_curves(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    example_inputs: Any,
    methods: Sequence[str] = ("weight", "activation", "ot"),
    steps: int = 21,
    bn_data: Any = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, InterpolationCurve]:
    """Interpolation curves from ``model_a`` to ``model_b``: naive, then after aligning B to A with each method.

    For models with BatchNorm the statistics are recomputed at every point on ``bn_data`` (default ``data``).

    Args:
        model_a, model_b: two models of one architecture.
        data: evaluation batches (the test set).
        example_inputs: a batch for tracing.
        methods: alignment methods of :func:`fusion.align` (activation matching aligns on ``bn_data``).
        steps: points per curve, end points included.
        bn_data: training batches for BatchNorm statistics and activation matching.
        progress: show progress bars.
        seed: seed of the alignment's sweep order.

    Returns:
        ``{"naive": curve, method: curve, ...}``.
    """
    calibration = data if bn_data is None else bn_data
    reset = has_batch_norm(model_a)
    curves = {"naive": interpolation_curve(model_a, model_b, data, steps=steps, reset_bn=reset, bn_data=calibration,
                                           progress=progress)}
    for method in methods:
        aligned = align(model_a, model_b, example_inputs, method=method, data=calibration, seed=seed, progress=progress)
        curves[method] = interpolation_curve(model_a, aligned.model, data, steps=steps, reset_bn=reset,
                                             bn_data=calibration, progress=progress)
    return curves


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def format_table(rows: Sequence[MethodResult]) -> str:
    """A plain-text table: model, method, test accuracy (%), test loss, seconds, peak memory (MiB)."""
    body = [
        (r.family, r.label, f"{100 * r.accuracy:.2f}", f"{r.loss:.4f}", f"{r.seconds:.2f}", f"{r.peak_memory_mb:.1f}")
        for r in rows
    ]
    return _render(("model", "method", "test acc %", "test loss", "time s", "peak MiB"), body)


def format_barriers(barriers: Mapping[str, Mapping[str, InterpolationCurve]]) -> str:
    """A plain-text table of loss and accuracy barriers: ``{family: {alignment: curve}}``.

    The model column is left out when the only family is named ``""``.
    """
    body = [
        (family, alignment, f"{curve.barrier:.4f}", f"{100 * curve.accuracy_barrier:.2f}")
        for family, curves in barriers.items()
        for alignment, curve in curves.items()
    ]
    header = ("model", "alignment", "loss barrier", "acc barrier %")
    if list(barriers) == [""]:
        return _render(header[1:], [row[1:] for row in body])
    return _render(header, body)


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoBudget:
    """How much work the demo does (the default and a quick variant for tests).

    Attributes:
        mlp_hidden: hidden widths of the MLPs.
        mlp_epochs: training epochs of each MLP.
        resnet_width: stem width of the SmallResNets.
        resnet_epochs: training epochs of each SmallResNet.
        steps: points on each interpolation curve.
        finetune_epochs: fine-tuning epochs after Neuron Transplantation.
        limit: keep at most this many samples per split (None: all of digits).
    """

    mlp_hidden: tuple[int, ...] = (256, 256)
    mlp_epochs: int = 10
    resnet_width: int = 16
    resnet_epochs: int = 6
    steps: int = 11
    finetune_epochs: int = 2
    limit: int | None = None


DEFAULT_BUDGET = DemoBudget()
QUICK_BUDGET = DemoBudget(mlp_hidden=(32, 32), mlp_epochs=2, resnet_width=4, resnet_epochs=1, steps=3,
                          finetune_epochs=1, limit=240)


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    Attributes:
        rows: the comparison table, both model families.
        barriers: ``{family: {alignment: InterpolationCurve}}`` (alignment ``"naive"``, ``"weight"``, ...).
        files: the files written.
        seconds: total wall time.
        budget: the budget used.
    """

    rows: tuple[MethodResult, ...]
    barriers: dict[str, dict[str, InterpolationCurve]]
    files: tuple[Path, ...]
    seconds: float
    budget: DemoBudget

    def report(self) -> str:
        """The two tables as printed by ``fusion demo``."""
        return (f"Fusion of two models trained from different seeds (digits test set)\n{format_table(self.rows)}\n\n"
                f"Interpolation barriers between the two members (lower is better)\n{format_barriers(self.barriers)}")


def run_demo(
    output_dir: PathLike = "results/demo", quick: bool = False, seed: int = 0, progress: bool = True
) -> DemoResult:
    """Train two MLPs and two SmallResNets on digits, align and fuse them every way, write tables and plots.

    For each family: two members from seeds ``seed`` and ``seed + 1``; interpolation curves naive and
    after weight, activation and OT alignment (plot ``interpolation_<family>.png``); every fusion method,
    Neuron Transplantation also after a short fine-tune, next to the best member and the ensemble.

    Args:
        output_dir: folder of the outputs: ``demo_results.json`` (table, barriers, curves, budget),
            ``demo_table.txt`` (the printed report) and one interpolation plot per family.
        quick: a tiny budget (tiny models on a subset, for tests; seconds).
        seed: seed of the split, the members and the alignments.
        progress: show progress bars.

    Returns:
        :class:`DemoResult`.
    """
    started = time.perf_counter()
    budget = QUICK_BUDGET if quick else DEFAULT_BUDGET
    out = Path(output_dir)
    split = get_data("digits", seed=seed, limit=budget.limit)
    train, test = make_loaders(split, batch_size=64, seed=seed)
    example = example_batch(split, 16)
    families: dict[str, tuple[Callable[[], nn.Module], int]] = {
        "MLP": (lambda: MLP(in_features=64, hidden=budget.mlp_hidden, num_classes=10), budget.mlp_epochs),
        "SmallResNet": (lambda: SmallResNet(in_channels=1, width=budget.resnet_width, num_classes=10),
                        budget.resnet_epochs),
    }
    rows: list[MethodResult] = []
    barriers: dict[str, dict[str, InterpolationCurve]] = {}
    files: list[Path] = []
    for family, (build, epochs) in families.items():
        members = train_models(build, split, (seed, seed + 1), epochs, lr=3e-3, progress=progress)
        barriers[family] = alignment_curves(members[0], members[1], test, example, steps=budget.steps, bn_data=train,
                                            progress=progress, seed=seed)
        labels = {"naive": "naive", "weight": "weight matching", "activation": "activation matching", "ot": "OT"}
        files.append(plot_interpolation({labels[k]: c for k, c in barriers[family].items()},
                                        out / f"interpolation_{family.lower()}.png",
                                        title=f"{family}: loss between two digits models, naive vs aligned"))
        rows += compare_methods(members, example, train, test, finetune_methods=("transplant",),
                                finetune_epochs=budget.finetune_epochs, lr=1e-3, family=family, progress=progress,
                                seed=seed)
    result = DemoResult(tuple(rows), barriers, (), time.perf_counter() - started, budget)
    summary = {
        "rows": [r.to_dict() for r in rows],
        "barriers": {f: {k: c.to_dict() for k, c in curves.items()} for f, curves in barriers.items()},
        "budget": asdict(budget),
        "seed": seed,
        "seconds": result.seconds,
        "torch_threads": torch.get_num_threads(),
    }
    files.append(save_json(summary, out / "demo_results.json"))
    files.append(write_text(out / "demo_table.txt", result.report() + "\n"))
    return DemoResult(result.rows, barriers, tuple(files), result.seconds, budget)
