"""Shared plumbing of the numbered experiments: options, data, seeded members, result files.

Every experiment is a script ``exNN_<name>.py`` with a ``main(argv) -> dict`` that parses
:func:`parent_parser`'s options (``--quick``, ``--dataset``, ``--data-root``, ``--output-dir``,
``--seed``, ``--threads``, ``--quiet``, ``--mlflow``), writes JSON and plots under
``results/exNN_<name>/`` (or ``--output-dir``) and returns its results. With ``--mlflow`` the run's
options, result numbers (lists as per-step series) and files also go to an MLflow run
(:mod:`fusion.tracking`; experiment = script name). Run one with
``python experiments/ex03_rebasin_barriers.py --quick``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
try:  # run from a checkout without installing the package
    import fusion  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fusion.analysis.io import atomic_path, save_json  # noqa: E402
from fusion.data import DATASETS, DataSplit, example_batch, get_data, make_loaders  # noqa: E402
from fusion.demo import train_models  # noqa: E402
from fusion.errors import FusionError  # noqa: E402
from fusion.tracking import active_tracker, add_tracking_options, tracking_run  # noqa: E402

__all__ = ["Run", "line_plot", "load_split", "parent_parser", "run_experiment", "script_main", "train_models"]


def parent_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every experiment shares; ``name`` (``"ex03_rebasin_barriers"``) sets the default output folder."""
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="a reduced budget that finishes in about a minute")
    parser.add_argument("--dataset", default="digits", choices=DATASETS, help="data set (digits is embedded)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder of the cifar10/cifar100/mnist files (mnist1d: its cache, default ~/.cache/fusion/mnist1d)")
    parser.add_argument("--output-dir", type=Path, default=Path("results") / name, help="where results are written")
    parser.add_argument("--seed", type=int, default=0, help="base seed (members use seed, seed + 1, ...)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the models are small: one thread avoids oversubscription)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many samples per split")
    parser.add_argument("--samples", type=int, default=5000,
                        help="mnist1d: signals generated, 80%% for training (5000: the standard 4000/1000 split; "
                             "12500: 10 000 training signals)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_tracking_options(parser)
    return parser


def load_split(args: argparse.Namespace, **kwargs: Any) -> DataSplit:
    """The data set named by ``--dataset`` (digits options such as ``image_size`` only apply to digits)."""
    if args.dataset != "digits":
        kwargs = {"num_samples": args.samples} if args.dataset == "mnist1d" else {}
    return get_data(args.dataset, args.data_root, seed=args.seed, limit=args.limit, **kwargs)


@dataclass
class Run:
    """One experiment run: its options, data, output folder and timer.

    Attributes:
        args: the parsed options.
        split: the data (None for an experiment without data).
        train, test: loaders over the split (batch size ``batch_size``).
        example_inputs: a training batch for tracing.
        out: the output folder (created).
    """

    args: argparse.Namespace
    split: DataSplit | None
    batch_size: int = 64
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=lambda: time.time() - 1.0)  # file times may be coarse

    def __post_init__(self) -> None:
        self.train = self.test = self.example_inputs = None
        if self.split is not None:
            self.train, self.test = make_loaders(self.split, batch_size=self.batch_size, seed=self.args.seed)
            self.example_inputs = example_batch(self.split, 16)
        self.out = Path(self.args.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)

    @property
    def progress(self) -> bool:
        return not self.args.quiet

    def members(self, build: Callable[[], nn.Module], count: int, epochs: int, lr: float = 1e-3,
                same_init: bool = False, offset: int = 0) -> list[nn.Module]:
        """``count`` models trained from seeds ``seed + offset``, ...

        With ``same_init`` all start from the first seed's initialisation (they differ in data order only).
        """
        seeds = [self.args.seed + offset + k for k in range(count)]
        inits = [seeds[0]] * count if same_init else None
        return train_models(build, self.split, seeds, epochs, lr=lr, batch_size=self.batch_size, init_seeds=inits,
                            progress=self.progress)

    def finish(self, results: dict[str, Any], name: str = "results.json") -> dict[str, Any]:
        """Add the run's settings and duration to ``results`` and write them to ``out/name``."""
        results = {
            **results,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()},
            "seconds": time.perf_counter() - self.started,
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads()},
        }
        path = save_json(results, self.out / name)
        written = [f for f in sorted(self.out.rglob("*")) if f.is_file() and f.stat().st_mtime >= self.started_wall]
        active_tracker().log_files(written)
        if self.progress:
            print(f"wrote {path} ({results['seconds']:.1f} s)", flush=True)
        return results


def run_experiment(parser: argparse.ArgumentParser, body: Callable[[Run], dict[str, Any]],
                   argv: Sequence[str] | None, batch_size: int = 64, needs_data: bool = True,
                   **split_kwargs: Any) -> dict[str, Any]:
    """Parse ``argv``, load the data (unless ``needs_data`` is False), run ``body`` and write its results.

    ``split_kwargs`` (e.g. ``image_size=16``) go to :func:`fusion.data.get_data` for digits. The results
    are written by :meth:`Run.finish`.
    """
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch_pruning")
    logging.basicConfig(level=logging.WARNING)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    experiment = args.mlflow_experiment or parser.prog.removesuffix(".py")
    with tracking_run(args.mlflow_uri if args.mlflow else None, experiment, params=settings):
        run = Run(args, load_split(args, **split_kwargs) if needs_data else None, batch_size=batch_size)
        return run.finish(body(run))


def script_main(main: Callable[[Sequence[str] | None], Any]) -> None:
    """Run an experiment's ``main`` as a script: bad input prints one ``error:`` line and exits with 1."""
    try:
        main(None)
    except (FusionError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(1) from None


def line_plot(path: Path, panels: Sequence[dict[str, Any]], title: str = "", width: float = 6.0) -> Path:
    """Write a figure of side-by-side line panels atomically (PNG by suffix).

    Each panel is ``{"x": [...], "series": {label: [y...]}, "xlabel": str, "ylabel": str}`` with
    optional ``"logx"`` (base 2), ``"styles"`` (label -> matplotlib format such as ``"--o"``) and
    ``"title"``. ``x`` may also be given per series as ``{label: (x, y)}`` in ``"xy"``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * len(panels), 4.5))
    FigureCanvasAgg(figure)
    for k, panel in enumerate(panels, start=1):
        ax = figure.add_subplot(1, len(panels), k)
        styles = panel.get("styles", {})
        pairs = dict(panel.get("xy", {}))
        pairs.update({label: (panel["x"], ys) for label, ys in panel.get("series", {}).items()})
        for label, (xs, ys) in pairs.items():
            ax.plot(xs, ys, styles.get(label, "-o"), markersize=4, label=label)
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.set_title(panel.get("title", ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=110)
    return Path(path)


def write_table(path: Path, table: str) -> Path:
    """Write a plain-text table atomically."""
    from fusion.analysis.io import write_text

    return write_text(path, table + "\n")
