"""A plain supervised training loop: training reference models and fine-tuning fused ones.

Fusion methods that damage the function of the merged network (vanilla averaging, the pruning
step of Neuron Transplantation, OT fusion) recover most of the ensemble's accuracy with a short
fine-tuning; :func:`finetune_with_history` records the loss along the way so experiments can
plot the "sacrifice, then recover" curve of Neuron Transplantation (Öz et al. 2024).
:func:`train_model` is the same loop, named for training from scratch.

Example:
    >>> model = train_model(MLP(hidden=(64,)), train_loader, epochs=3, lr=1e-3, seed=0)
    >>> result = finetune_with_history(fused, train_loader, epochs=1, eval_data=test_loader)
    >>> [(r.step, r.eval_accuracy) for r in result.history]
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_finite, iter_batches, model_device, move_inputs, run_model
from ..errors import DataError, NonFiniteWeightsError
from ..evaluate import evaluate, logits_and_targets
from ..progress import tqdm

__all__ = ["OPTIMIZERS", "FinetuneRecord", "FinetuneResult", "finetune", "finetune_with_history", "train_model"]

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Optimizer names accepted by :func:`finetune`.
OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class FinetuneRecord:
    """One point of a training curve.

    Attributes:
        epoch: epochs completed when recorded (0 for the record before training).
        step: optimizer steps taken so far.
        train_loss: mean training loss since the previous record (NaN for the record before training).
        eval_loss: loss on ``eval_data`` at this point (None without ``eval_data``).
        eval_accuracy: accuracy on ``eval_data`` at this point (None without ``eval_data``).
    """

    epoch: int
    step: int
    train_loss: float
    eval_loss: float | None = None
    eval_accuracy: float | None = None


@dataclass(frozen=True)
class FinetuneResult:
    """Result of :func:`finetune_with_history`: the trained model and its training curve."""

    model: nn.Module
    history: tuple[FinetuneRecord, ...]


def _make_optimizer(
    name: str, params: Any, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _check_arguments(epochs: int, lr: float, optimizer: str, schedule: str, max_steps: int | None,
                     eval_every: int | None) -> None:
    if not isinstance(epochs, int) or epochs < 0:
        raise DataError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise DataError(f"lr must be a positive finite number, got {lr!r}")
    if optimizer not in OPTIMIZERS:
        raise DataError(f"unknown optimizer {optimizer!r}; expected one of {list(OPTIMIZERS)}")
    if schedule not in _SCHEDULES:
        raise DataError(f"unknown schedule {schedule!r}; expected one of {list(_SCHEDULES)}")
    for name, value in (("max_steps", max_steps), ("eval_every", eval_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{name} must be a positive integer or None, got {value!r}")


def _total_steps(data: Any, epochs: int, max_steps: int | None) -> int | None:
    """Steps the run will take, if the data has a length (needed by the cosine schedule and the bar)."""
    try:
        total = len(data) * epochs
    except TypeError:
        total = None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    return total


class _Curve:
    """Collects :class:`FinetuneRecord` s: the running train loss and optional evaluations."""

    def __init__(self, model: nn.Module, eval_data: Any, loss_fn: LossFn | None) -> None:
        self.model, self.eval_data, self.loss_fn = model, eval_data, loss_fn
        self.records: list[FinetuneRecord] = []
        self.loss_sum, self.loss_count = 0.0, 0

    def add_loss(self, loss: float) -> None:
        self.loss_sum += loss
        self.loss_count += 1

    def record(self, epoch: int, step: int) -> None:
        if self.records and self.records[-1].step == step:  # nothing new since the last record
            self.records[-1] = dataclasses.replace(self.records[-1], epoch=epoch)
            return
        train_loss = self.loss_sum / self.loss_count if self.loss_count else math.nan
        eval_loss = eval_accuracy = None
        if self.eval_data is not None:
            result = evaluate(self.model, self.eval_data, loss_fn=self.loss_fn)
            eval_loss, eval_accuracy = result.loss, result.accuracy
        self.records.append(FinetuneRecord(epoch, step, train_loss, eval_loss, eval_accuracy))
        self.loss_sum, self.loss_count = 0.0, 0
        logger.debug("epoch %d step %d: train loss %.4f, eval loss %s", epoch, step, train_loss, eval_loss)


def finetune_with_history(
    model: nn.Module,
    data: Any,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    progress: bool = True,
    inplace: bool = False,
    max_steps: int | None = None,
    schedule: str = "constant",
    eval_data: Any = None,
    eval_every: int | None = None,
) -> FinetuneResult:
    """Train ``model`` on labelled ``data`` and record its training curve.

    A record is taken before training, after every ``eval_every`` steps (if given), at the end of
    every epoch and at the end. Each holds the mean training loss since the previous record and,
    with ``eval_data``, the evaluation loss and accuracy at that point.

    Args:
        model: the model to train (copied unless ``inplace``); the copy is returned in the train/eval
            mode the input was in.
        data: DataLoader or re-iterable of ``(inputs, targets)`` batches, iterated once per epoch.
        epochs: passes over ``data``.
        lr: learning rate.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with ``momentum``).
        weight_decay: L2 penalty (decoupled for AdamW).
        momentum: SGD momentum.
        loss_fn: ``loss_fn(logits, targets)`` -> mean loss; default cross-entropy.
        seed: seeds the random operations of the model (dropout) without touching the caller's global
            RNG state; the data order is the loader's business (see :func:`fusion.data.make_loaders`).
        progress: show a progress bar over batches.
        inplace: train ``model`` itself instead of a copy.
        max_steps: stop after this many optimizer steps.
        schedule: ``"constant"`` or ``"cosine"`` learning rate (cosine needs the number of steps:
            ``data`` with a length, or ``max_steps``).
        eval_data: labelled data evaluated at each record (e.g. the test loader).
        eval_every: also record every this many steps.

    Returns:
        :class:`FinetuneResult` with the trained model and the records.

    Raises:
        DataError: empty or unlabelled data, or an invalid hyperparameter.
        NonFiniteWeightsError: the model holds NaN/inf, or the loss became non-finite (lower ``lr``).
    """
    _check_arguments(epochs, lr, optimizer, schedule, max_steps, eval_every)
    check_finite(model)
    total = _total_steps(data, epochs, max_steps)
    if schedule == "cosine" and total is None:
        raise DataError("schedule='cosine' needs the number of steps: pass data with a length or max_steps")
    model = model if inplace else copy.deepcopy(model)
    device = model_device(model)
    opt = _make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, weight_decay, momentum)
    scheduler = None
    if schedule == "cosine" and total:
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    curve = _Curve(model, eval_data, loss_fn)
    curve.record(0, 0)
    step = 0
    with (
        _restored_modes(model),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        tqdm(total=total, desc="train", disable=not progress) as bar,
    ):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            model.train()
            for inputs, targets in iter_batches(data):
                loss = _train_step(model, inputs, targets, opt, loss_fn, device, step)
                if scheduler is not None:
                    scheduler.step()
                step += 1
                curve.add_loss(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if eval_every is not None and step % eval_every == 0:
                    curve.record(epoch - 1, step)
                if max_steps is not None and step >= max_steps:
                    break
            curve.record(epoch, step)
            if max_steps is not None and step >= max_steps:
                break
    return FinetuneResult(model=model, history=tuple(curve.records))


def _train_step(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    opt: torch.optim.Optimizer,
    loss_fn: LossFn | None,
    device: torch.device,
    step: int,
) -> float:
    """One optimizer step on one batch; returns the batch loss."""
    if targets is None:
        raise DataError("training needs labelled data: a batch had no targets (expected (inputs, targets))")
    logits, targets = logits_and_targets(run_model(model, move_inputs(inputs, device), "data"), targets)
    loss = F.cross_entropy(logits, targets) if loss_fn is None else loss_fn(logits, targets)
    if not torch.isfinite(loss):
        raise NonFiniteWeightsError(f"the training loss became {float(loss.detach())} at step {step}; lower lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@contextlib.contextmanager
def _restored_modes(model: nn.Module) -> Iterator[None]:
    """Put every submodule back in its train/eval mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def finetune(model: nn.Module, data: Any, epochs: int = 1, lr: float = 1e-3, **kwargs: Any) -> nn.Module:
    """Train ``model`` on ``data`` and return the trained copy: :func:`finetune_with_history` without the curve.

    Args:
        model: the model (not modified unless ``inplace=True``).
        data: labelled batches.
        epochs: passes over ``data``.
        lr: learning rate.
        **kwargs: ``optimizer`` ("adam" | "adamw" | "sgd"), ``weight_decay``, ``momentum``, ``loss_fn``,
            ``seed``, ``progress``, ``inplace``, ``max_steps``, ``schedule``, ``eval_data``, ``eval_every``,
            as for :func:`finetune_with_history`.

    Returns:
        The trained model.
    """
    return finetune_with_history(model, data, epochs=epochs, lr=lr, **kwargs).model


#: Training from scratch is the same loop: ``train_model(model, data, epochs, lr, seed=...)``.
train_model = finetune
