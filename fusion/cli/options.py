"""Shared command-line options, argument types and the help formatter."""


from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..tracking import add_tracking_options

ALIGN_METHODS = ("weight", "activation", "ot")
FUSE_METHODS = ("average", "merge", "merge-repair", "ot", "transplant")
DISTANCE_METRICS = ("normalized_l2", "relative", "raw_l2")
CURVE_SUMMARY = "analysis_summary.json"
DEPTHS = ("early", "mid", "late")  # fusion.neuronswap.DEPTHS, without importing the library at start-up


class _DatasetNames(Sequence[str]):
    """``fusion.data.DATASETS``, read when argparse first needs it (to check a value or print a command's help),
    so that building the parser does not import torch."""

    def _names(self) -> Sequence[str]:
        from ..data import DATASETS

        return DATASETS

    def __getitem__(self, index: Any) -> Any:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


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
    parent = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parent.add_argument_group("general")
    group.add_argument("--output-dir", type=Path, help="folder for the results (created if needed)")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    add_tracking_options(parent)
    return parent


def _model_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parent.add_argument_group("model")
    group.add_argument(
        "--arch",
        help="architecture: mlp | vgg | resnet (fusion.models), a torchvision name (resnet18, vit_b_16, ...) or "
        "module:Class, hf:<save_pretrained folder>, hf-config:<transformers class>:<config JSON> or timm:<name> "
        "(never downloaded); may be omitted for .safetensors files written by fusion and for save_pretrained folders",
    )
    group.add_argument("--num-classes", type=_positive_int, help="outputs of the model (default: the data set's)")
    group.add_argument("--arch-kwargs", type=_json_object, default={}, metavar="JSON",
                       help="constructor arguments as a JSON object, e.g. '{\"hidden\": [64, 64]}'")
    group.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    return parent


def _data_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parent.add_argument_group("data")
    group.add_argument("--dataset", default="digits", choices=_DatasetNames(),
                       help="data set (default digits: embedded, offline); the others are read from --data-root")
    group.add_argument("--data-root", type=Path,
                       help="folder holding cifar-10-batches-py/, cifar-100-python/ or MNIST/")
    group.add_argument("--image-size", type=_positive_int, help="resize the 8x8 digits to this size (digits only)")
    group.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (default 128)")
    group.add_argument("--limit", type=_positive_int, help="use at most this many samples of each split")
    return parent


def _input_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
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



def _curve_analysis_options(parser: argparse.ArgumentParser) -> None:
    """Options of the analysis shared by ``curve`` and ``analyze-curve``."""
    parser.add_argument("--num-points", type=int, default=61, help="points evaluated along the curve")
    parser.add_argument("--metric", choices=DISTANCE_METRICS, default="normalized_l2", help="distance in the plots")
    parser.add_argument("--fps", type=_positive_int, default=10, help="frames per second of the GIF")
    parser.add_argument("--highlight", nargs="*", metavar="LAYER", help="layers drawn in red")
    parser.add_argument("--swap-metadata", type=Path, metavar="JSON",
                        help="metadata of 'fusion swap': highlights the swapped layer and goes into the summary")
