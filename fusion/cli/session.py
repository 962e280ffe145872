"""Data, models and outputs of one command, loaded on first use; printing helpers."""


from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    ARCH_KEY,
    KWARGS_KEY,
    architecture_metadata,
    build_architecture,
    load_model,
    read_metadata,
)
from ..data import DataSplit, example_batch, get_data, make_loaders
from ..errors import DataError
from ..external import example_inputs_for
from ..tracking import active_tracker


class _Session:
    """Data and models of one command, loaded on first use."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.progress = not args.quiet
        self._split: DataSplit | None = None
        self._loaders: tuple[Any, Any] | None = None
        self._stored_architecture: dict[str, str] = {}  # from the inputs' metadata when --arch is not given
        self._last_model: nn.Module | None = None  # decides the form of random example inputs

    @property
    def split(self) -> DataSplit:
        if self._split is None:
            args = self.args
            kwargs: dict[str, Any] = {}
            if args.image_size is not None:
                if args.dataset != "digits":
                    raise DataError(f"--image-size applies to the digits data set only, not {args.dataset!r}")
                kwargs["image_size"] = args.image_size
            self._split = get_data(args.dataset, args.data_root, seed=args.seed, limit=args.limit, **kwargs)
        return self._split

    @property
    def loaders(self) -> tuple[Any, Any]:
        """``(train, test)`` loaders."""
        if self._loaders is None:
            self._loaders = make_loaders(self.split, batch_size=self.args.batch_size, seed=self.args.seed)
        return self._loaders

    @property
    def uses_data(self) -> bool:
        return getattr(self.args, "input_shape", None) is None

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self.split.input_shape if self.uses_data else self.args.input_shape

    @property
    def num_classes(self) -> int | None:
        if self.args.num_classes is not None:
            return self.args.num_classes
        return self.split.num_classes if self.uses_data else None

    def example_inputs(self, count: int = 16) -> torch.Tensor:
        """A batch for tracing: training inputs, or seeded random inputs of ``--input-shape``."""
        if self.uses_data:
            return example_batch(self.split, count)
        generator = torch.Generator().manual_seed(self.args.seed)
        if self._last_model is not None:  # token ids / keyword inputs for transformers models
            return example_inputs_for(self._last_model, count, tuple(self.args.input_shape), generator)
        return torch.randn((count, *self.args.input_shape), generator=generator)

    def model(self, path: Path | None) -> nn.Module:
        """The checkpoint at ``path`` (or a freshly initialised model when ``path`` is None), in eval mode."""
        args = self.args
        if path is None:
            if args.arch is None:
                raise DataError("pass --arch (and a checkpoint, or a fresh randomly initialised model is used)")
            model = build_architecture(args.arch, self.num_classes, self.input_shape, **args.arch_kwargs)
            self._last_model = model.to(args.device).eval()
            return self._last_model
        if args.arch is None and not self._stored_architecture and not Path(path).is_dir():
            stored = read_metadata(path)
            self._stored_architecture = {k: stored[k] for k in (ARCH_KEY, KWARGS_KEY) if k in stored}
        self._last_model = load_model(path, args.arch, self.num_classes, self.input_shape, args.device,
                                      **args.arch_kwargs)
        return self._last_model

    def models(self, paths: Sequence[Path], minimum: int, maximum: int | None = None) -> list[nn.Module]:
        if len(paths) < minimum or (maximum is not None and len(paths) > maximum):
            wanted = str(minimum) if maximum == minimum else f"at least {minimum}"
            raise DataError(f"expected {wanted} checkpoints, got {len(paths)}")
        return [self.model(Path(p)) for p in paths]

    def output_dir(self, default: str) -> Path:
        return Path(self.args.output_dir) if self.args.output_dir is not None else Path(default)

    def metadata(self) -> dict[str, str]:
        """Architecture metadata stored in ``.safetensors`` outputs (so later commands need no --arch)."""
        if self.args.arch is None:
            return dict(self._stored_architecture)
        kwargs = dict(self.args.arch_kwargs)
        if self.num_classes is not None:
            kwargs.setdefault("num_classes", self.num_classes)
        return architecture_metadata(self.args.arch, **kwargs)

    def checkpoint_path(self, folder: Path, stem: str, like: Path | str | None) -> Path:
        suffix = getattr(self.args, "format", None)
        if suffix is None:
            suffix = "safetensors" if like is not None and str(like).endswith(".safetensors") else "pt"
        return folder / f"{stem}.{suffix}"


def _evaluation(model: nn.Module, data: Any) -> dict[str, float]:
    from ..evaluate import evaluate

    result = evaluate(model, data)
    return {"accuracy": result.accuracy, "loss": result.loss}


def _echo(text: str) -> None:
    print(text, flush=True)


def _wrote(paths: Sequence[Path]) -> None:
    for path in paths:
        _echo(f"wrote {path}")
    active_tracker().log_files(paths)
