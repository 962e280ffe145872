"""Loss and accuracy of a model, or of an output-averaging ensemble, on labelled data.

Every fusion method is judged against two baselines: the members themselves and their ensemble
(the mean of their outputs), which fusion tries to match with one model's cost (e.g. Neuron
Transplantation, Öz et al.). Models are run in eval mode without gradients and put back in
the train/eval mode they were in.

Example:
    >>> result = evaluate(model, test_loader)
    >>> result.accuracy, result.loss
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checks import (
    check_models,
    check_same_device,
    check_weights,
    eval_mode,
    iter_batches,
    main_output,
    model_device,
    move_inputs,
    run_model,
)
from .errors import DataError, EnsembleError
from .progress import tqdm

__all__ = ["Evaluation", "ensemble_evaluate", "evaluate", "predict_logits"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Evaluation:
    """Result of :func:`evaluate`.

    Attributes:
        loss: mean loss per sample (cross-entropy by default).
        accuracy: share of samples whose arg-max output equals the label, in [0, 1].
        num_samples: number of samples seen.
    """

    loss: float
    accuracy: float
    num_samples: int


def logits_and_targets(output: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A model's output and a batch's targets in the shapes cross-entropy reads.

    The logits are the output's main tensor (:func:`~fusion.checks.main_output`: a Hugging Face
    ``ModelOutput``'s ``logits``). Logits ``(N, C)`` or ``(N, C, ...)`` with targets ``(N,)`` or
    ``(N, ...)`` are kept; per-token logits with the classes last, ``(N, T, C)`` with targets
    ``(N, T)`` (language models), are flattened to ``(N * T, C)`` and ``(N * T,)``, one sample per token.
    """
    logits = main_output(output)
    targets = torch.as_tensor(targets).to(logits.device)
    channels_first = targets.shape == logits.shape[:1] + logits.shape[2:]
    if logits.dim() > 2 and not channels_first and targets.shape == logits.shape[:-1]:
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return logits, targets


def _batch_size(targets: torch.Tensor) -> int:
    return int(targets.shape[0]) if targets.dim() > 0 else 1


def _score(
    forward: Callable[[Any], torch.Tensor],
    data: Any,
    device: torch.device,
    loss_fn: LossFn | None,
    progress: bool,
    desc: str,
) -> Evaluation:
    """Accumulate sample-weighted loss and accuracy of ``forward`` over labelled ``data``."""
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in tqdm(iter_batches(data), desc=desc, disable=not progress, leave=False):
            if targets is None:
                raise DataError("evaluation needs labelled data: a batch had no targets (expected (inputs, targets))")
            logits, targets = logits_and_targets(forward(move_inputs(inputs, device)), targets)
            n = _batch_size(targets)
            if loss_fn is None:
                total_loss += float(F.cross_entropy(logits, targets, reduction="sum"))
            else:
                total_loss += float(loss_fn(logits, targets)) * n
            correct += int((logits.argmax(dim=1) == targets).sum())
            count += n
    if count == 0:
        raise DataError("data has no samples")
    return Evaluation(loss=total_loss / count, accuracy=correct / count, num_samples=count)


def evaluate(
    model: nn.Module,
    data: Any,
    loss_fn: LossFn | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Evaluation:
    """Mean loss and accuracy of ``model`` on ``data``, in eval mode and without gradients.

    Args:
        model: a classifier mapping inputs ``(N, ...)`` to logits ``(N, C)`` (or ``(N, C, ...)``).
        data: a DataLoader or iterable of ``(inputs, targets)`` batches with integer targets ``(N,)``.
        loss_fn: ``loss_fn(logits, targets)`` returning the batch's mean loss; default cross-entropy.
        device: where to run the batches (default: the model's device; the model itself is not moved).
        progress: show a progress bar over batches.

    Returns:
        :class:`Evaluation` with sample-weighted mean loss, accuracy in [0, 1] and the sample count.

    Raises:
        DataError: empty data or unlabelled batches.
        ExampleInputError: the model rejected a batch.
    """
    device = model_device(model) if device is None else torch.device(device)
    with eval_mode(model):
        return _score(lambda x: run_model(model, x, "data"), data, device, loss_fn, progress, "evaluate")


def predict_logits(
    model: nn.Module, data: Any, device: torch.device | str | None = None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All outputs of ``model`` on ``data`` (eval mode, no gradients), concatenated on the CPU.

    Returns:
        ``(logits, targets)``: logits of shape ``(N, C)``; targets ``(N,)``, or None if the data is unlabelled.
    """
    device = model_device(model) if device is None else torch.device(device)
    outputs, labels = [], []
    with eval_mode(model), torch.no_grad():
        for inputs, targets in tqdm(iter_batches(data), desc="predict", disable=not progress, leave=False):
            outputs.append(main_output(run_model(model, move_inputs(inputs, device), "data")).cpu())
            if targets is not None:
                labels.append(torch.as_tensor(targets).cpu())
    if labels and len(labels) != len(outputs):
        raise DataError("some batches of data have targets and some do not")
    return torch.cat(outputs), (torch.cat(labels) if labels else None)


def ensemble_evaluate(
    models: Sequence[nn.Module],
    data: Any,
    weights: Sequence[float] | None = None,
    combine: str = "logits",
    loss_fn: LossFn | None = None,
    progress: bool = False,
) -> Evaluation:
    """Loss and accuracy of the output-averaging ensemble of ``models``.

    The ensemble's output is the weighted mean of the members' logits (``combine="logits"``), or
    the log of the weighted mean of their softmax probabilities (``combine="probs"``), whose
    cross-entropy is then the negative log-likelihood of the averaged prediction.

    Args:
        models: one or more classifiers with the same output shape, on one device (architectures may differ).
        data: labelled batches as for :func:`evaluate`.
        weights: member weights, non-negative and summing to 1 (default uniform).
        combine: ``"logits"`` or ``"probs"``.
        loss_fn: as for :func:`evaluate`.
        progress: show a progress bar.

    Raises:
        EnsembleError: no models, bad weights or unknown ``combine``.
    """
    if isinstance(models, nn.Module):
        raise EnsembleError("expected a list of models, got a single nn.Module")
    models = list(models)
    if not models:
        raise EnsembleError("expected at least 1 model, got 0")
    names = [f"models[{k}]" for k in range(len(models))]
    for name, model in zip(names, models):
        check_models([model], names=[name])
    check_same_device(models, names)
    if combine not in ("logits", "probs"):
        raise EnsembleError(f"unknown combine {combine!r}; expected 'logits' or 'probs'")
    weights = check_weights(weights, len(models))
    device = model_device(models[0])

    def forward(inputs: Any) -> torch.Tensor:
        outputs = [main_output(run_model(m, inputs, "data")) for m in models]
        if combine == "logits":
            return sum(w * out for w, out in zip(weights, outputs))
        return torch.logsumexp(
            torch.stack([math.log(w) + F.log_softmax(out, dim=1) for w, out in zip(weights, outputs) if w > 0]), 0
        )

    with ExitStack() as stack:
        for model in models:
            stack.enter_context(eval_mode(model))
        return _score(forward, data, device, loss_fn, progress, "ensemble")
