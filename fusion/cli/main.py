"""The argument parser and the entry point of the ``fusion`` command."""


from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import FusionError
from ..tracking import tracking_run
from .commands_merge import add_merge_yaml
from .config import _config_defaults, _read_config
from .options import (
    ALIGN_METHODS,
    DEPTHS,
    DISTANCE_METRICS,
    FUSE_METHODS,
    _common_options,
    _config_option,
    _curve_analysis_options,
    _data_options,
    _format_option,
    _Formatter,
    _input_options,
    _model_options,
    _non_negative_int,
    _positive_int,
    _two_models,
)

__all__ = ["build_parser", "main"]

logger = logging.getLogger("fusion.cli")


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The handler ``name`` of ``fusion.cli.<module>``, imported when the command runs (``--help`` stays fast)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f".{module}", __package__), name)(args)

    run.__name__ = run.__qualname__ = name
    return run


_cmd_demo, _cmd_spec, _cmd_swap = (_command("commands_model", n) for n in ("_cmd_demo", "_cmd_spec", "_cmd_swap"))
_cmd_align, _cmd_fuse, _cmd_interpolate, _cmd_distances = (
    _command("commands_fuse", n) for n in ("_cmd_align", "_cmd_fuse", "_cmd_interpolate", "_cmd_distances"))
_cmd_curve, _cmd_analyze_curve, _cmd_plot = (
    _command("commands_curve", n) for n in ("_cmd_curve", "_cmd_analyze_curve", "_cmd_plot"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fusion`` command (subcommands with their handlers as ``func``)."""
    parser = argparse.ArgumentParser(
        prog="fusion",
        description="Compare, align and fuse PyTorch models through their permutation symmetries.",
        epilog="Run 'fusion <command> --help' for the options of a command; 'fusion demo' for a first look.",
        allow_abbrev=False,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"fusion {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    common, model, data, inputs = _common_options(), _model_options(), _data_options(), _input_options()

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str, parents: list,
            aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=parents,
                                  formatter_class=_Formatter, aliases=list(aliases), allow_abbrev=False)
        sub.set_defaults(func=handler, subparser=sub)
        return sub

    demo = add("demo", _cmd_demo, "train, align and fuse small models on the embedded digits data and compare "
               "every fusion method (default output: results/demo; one torch thread unless --threads)", [common])
    demo.add_argument("--quick", action="store_true", help="a tiny budget (a few seconds; for tests)")

    spec = add("spec", _cmd_spec, "print a model's permutation groups and their coverage",
               [common, model, data, inputs])
    spec.add_argument("checkpoint", nargs="?", type=Path, help="checkpoint (default: a randomly initialised --arch)")

    swap = add("swap", _cmd_swap, "swap pairs of neurons of a layer without changing the function; save the model "
               "and a metadata JSON naming what was swapped (default output: results/swap)", [common, model, data, inputs])
    swap.add_argument("checkpoint", type=Path, help="checkpoint of the model")
    where = swap.add_mutually_exclusive_group(required=True)
    where.add_argument("--layer", "--layer-name", help="module whose output units are swapped (e.g. features.4; a "
                       "norm layer stands for the units it normalises)")
    where.add_argument("--depth", "--layer-depth", choices=DEPTHS,
                       help="pick a convolution by block position (blocks end where the feature map shrinks): early = "
                       "block 0 layer 0, mid = layer 1 of the middle block, late = layer 1 of the last block (VGG-16: "
                       "block 0 layer 0, block 2 layer 1, block 4 layer 1); models without convolutions: linear layers")
    swap.add_argument("--num-swaps", type=_positive_int, default=1, metavar="N",
                      help="number of random unit pairs to swap, drawn by --seed (default 1: two neurons)")
    swap.add_argument("--neurons", type=int, nargs="+", metavar="I J",
                      help="the units to swap, as pairs (I J [I J ...]; default: --num-swaps random pairs)")
    swap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                      help="check functional equivalence on the whole test split (or on random --input-shape inputs); "
                      "--no-verify skips it (default: verify)")
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
    curve.add_argument("--num-bends", "--bends", type=int, default=3, help="Bezier bends including the end points")
    curve.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of the control points")
    curve.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    curve.add_argument("--weight-decay", "--wd", type=float, default=0.0, help="SGD weight decay of the control points")
    _curve_analysis_options(curve)
    _config_option(curve)

    analyze = add("analyze-curve", _cmd_analyze_curve, "analyse a curve trained by 'fusion curve' again (no training): "
                  "the same npz, analysis_summary.json, heatmap PNG and GIF (default output: next to the curve)",
                  [common, model, data])
    analyze.add_argument("--curve-checkpoint", type=Path, required=True, metavar="FILE",
                         help="curve.pt written by 'fusion curve' (end points and control points)")
    analyze.add_argument("--original-checkpoint", type=Path, metavar="FILE",
                         help="the model distances are measured from (default: the curve's start)")
    _curve_analysis_options(analyze)

    plot = add("plot", _cmd_plot, "re-plot saved results: a curve .npz gives a heatmap and a GIF; interpolation "
               ".npz/.json files give one curve plot (default output: next to the first input)", [common])
    plot.add_argument("inputs", nargs="*", type=Path, metavar="FILE", help="result files (.npz or .json)")
    plot.add_argument("--data", type=Path, action="append", default=[], metavar="FILE",
                      help="a result file (same as a positional FILE; may repeat)")
    plot.add_argument("--output", type=Path, metavar="FILE",
                      help="write the one plot to this file; its suffix picks the kind for a curve .npz (.gif: the "
                      "animation, .png: the heatmap)")
    plot.add_argument("--heatmap", action="store_true",
                      help="with --output ANIMATION.gif: also write the static heatmap as ANIMATION_heatmap.png")
    plot.add_argument("--kind", choices=("auto", "heatmap", "gif", "interpolation"), default="auto",
                      help="what to draw")
    plot.add_argument("--metric", choices=(*DISTANCE_METRICS, "loss", "accuracy"),
                      help="distance metric (curves; default normalized_l2) or loss/accuracy (interpolation; "
                      "default loss)")
    plot.add_argument("--fps", type=_positive_int, default=10, help="frames per second of the GIF")
    plot.add_argument("--highlight", nargs="*", metavar="LAYER", help="layers drawn in red")

    add_merge_yaml(commands, _Formatter)
    return parser



def _configure(args: argparse.Namespace) -> None:
    import torch

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
    import torch  # after parsing: --help and usage errors never import it

    threads = torch.get_num_threads()  # restored afterwards: main() may run inside a longer-lived process
    try:
        if getattr(args, "config", None) is not None:
            sub = args.subparser
            sub.set_defaults(**_config_defaults(sub, _read_config(args.config), args.config))
            args = parser.parse_args(argv)
        _configure(args)
        uri = args.mlflow_uri if getattr(args, "mlflow", False) else None
        with tracking_run(uri, getattr(args, "mlflow_experiment", None) or args.command,
                          params={k: v for k, v in vars(args).items() if k not in ("func", "subparser")}):
            return int(args.func(args) or 0)
    except (FusionError, OSError) as exc:
        print(f"fusion: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fusion: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
