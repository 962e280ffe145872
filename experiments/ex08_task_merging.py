"""Experiment 08: merging fine-tunes of one base with every task-vector method, and what aligning first does.

A small MLP (``fusion.models.MLP``) is trained briefly on all ten digit classes (the "pretrained"
base), then fine-tuned separately on two sub-tasks, classes 0-4 (task A) and 5-9 (task B): each
fine-tune forgets the other task. The two fine-tunes are merged back with every method of
:func:`fusion.merge_task_vectors` (task arithmetic, TIES, DARE linear/TIES, breadcrumbs, Model Stock,
SLERP between the fine-tunes, linear averaging), and each model's accuracy is measured on task A's
and task B's test samples and on all of them.

Second part: the task-B fine-tune starts from a *permuted copy* of the base (the same function, its
hidden units shuffled), as when members were re-initialised or exported in another basis. Its task
vector against the base is then meaningless; ``align_first=True`` aligns it to the base's basis by
weight matching before merging.

Outputs: ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import excommon as common
import torch
from torch import nn

from fusion import merge_task_vectors, permutation_spec, permute, random_permutation
from fusion.models import MLP

NAME = "ex08_task_merging"
TASKS = {"A (0-4)": range(0, 5), "B (5-9)": range(5, 10)}


def tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x) for x in xs]).float(), torch.as_tensor(ys)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    return model.eval()


@torch.no_grad()
def accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    predicted = model.eval()(x).argmax(1)
    out = {}
    for name, classes in TASKS.items():
        mask = torch.isin(y, torch.tensor(list(classes)))
        out[name] = (predicted[mask] == y[mask]).float().mean().item()
    out["all"] = (predicted == y).float().mean().item()
    return out


def subset(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.isin(y, torch.tensor(list(classes)))
    return x[mask], y[mask]


def merges(base: nn.Module, tunes: list[nn.Module], **extra: Any) -> dict[str, nn.Module]:
    """Every method on the two fine-tunes, with common settings (weights 1, density 0.5 where used)."""
    return {
        "task_arithmetic": merge_task_vectors(base, tunes, "task_arithmetic", weights=1.0, **extra),
        "ties (density 0.5)": merge_task_vectors(base, tunes, "ties", weights=1.0, density=0.5, **extra),
        "dare_linear (density 0.5)": merge_task_vectors(base, tunes, "dare_linear", weights=1.0, density=0.5, **extra),
        "dare_ties (density 0.5)": merge_task_vectors(base, tunes, "dare_ties", weights=1.0, density=0.5, **extra),
        "breadcrumbs (density 0.8)": merge_task_vectors(base, tunes, "breadcrumbs", weights=1.0, density=0.8, **extra),
        "model_stock": merge_task_vectors(base, tunes, "model_stock", **extra),
        "linear (mean)": merge_task_vectors(base, tunes, "linear", **extra),
    }


def body(run: common.Run) -> dict[str, Any]:
    args = run.args
    quick = args.quick
    x_train, y_train = tensors(run.split.train)
    x_test, y_test = tensors(run.split.test)
    torch.manual_seed(args.seed)
    base = MLP(in_features=x_train[0].numel(), hidden=(64, 64) if quick else (256, 256), num_classes=10)
    base = train(base, x_train, y_train, epochs=1, lr=1e-3, seed=args.seed)
    epochs = 3 if quick else 10
    tunes = [train(copy.deepcopy(base), *subset(x_train, y_train, classes), epochs=epochs, lr=1e-3, seed=args.seed + k)
             for k, classes in enumerate(TASKS.values())]
    rows = {"base": accuracies(base, x_test, y_test), "fine-tune A": accuracies(tunes[0], x_test, y_test),
            "fine-tune B": accuracies(tunes[1], x_test, y_test)}
    for name, model in merges(base, tunes).items():
        rows[name] = accuracies(model, x_test, y_test)
    rows["slerp A->B (t 0.5)"] = accuracies(merge_task_vectors(tunes[0], [tunes[1]], "slerp", t=0.5), x_test, y_test)

    # Part 2: task B fine-tuned from a permuted copy of the base.
    example = x_train[:16]
    spec = permutation_spec(base, example)
    permuted_base = permute(base, random_permutation(spec, seed=args.seed + 7), spec)
    tune_b = train(copy.deepcopy(permuted_base), *subset(x_train, y_train, TASKS["B (5-9)"]), epochs=epochs, lr=1e-3,
                   seed=args.seed + 1)
    permuted = {"fine-tune B (from permuted base)": accuracies(tune_b, x_test, y_test)}
    for align_first in (False, True):
        for method, kwargs in (("task_arithmetic", {"weights": 1.0}), ("ties", {"weights": 1.0, "density": 0.5})):
            model = merge_task_vectors(base, [tunes[0], tune_b], method, align_first=align_first, spec=spec, **kwargs)
            permuted[f"{method}, align_first={align_first}"] = accuracies(model, x_test, y_test)
    table = format_table(rows, "merging two sub-task fine-tunes of one base")
    table += "\n\n" + format_table(permuted, "task B fine-tuned from a permuted copy of the base")
    common.write_table(run.out / "table.md", table)
    if run.progress:
        print(table, flush=True)
    return {"merges": rows, "permuted_member": permuted}


def format_table(rows: dict[str, dict[str, float]], title: str) -> str:
    columns = [*TASKS, "all"]
    lines = [f"**{title}** (test accuracy)", "", "| model | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(f"{100 * acc[c]:.1f}" for c in columns) + " |" for name, acc in rows.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.parent_parser(NAME, __doc__.splitlines()[0])
    return common.run_experiment(parser, body, argv)


if __name__ == "__main__":
    common.script_main(main)
