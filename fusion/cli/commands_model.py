"""Commands on one model: demo, spec, swap."""


from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ..analysis.io import save_json
from ..checkpoint import (
    save_model,
)
from ..errors import PermutationError
from .session import _echo, _Session, _wrote


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    if args.threads is None:  # the demo's models are tiny: one thread avoids oversubscribing the cores
        torch.set_num_threads(1)
    output = Path(args.output_dir) if args.output_dir is not None else Path("results/demo")
    result = run_demo(output, quick=args.quick, seed=args.seed, progress=not args.quiet)
    _echo(result.report())
    _wrote(result.files)
    _echo(f"demo finished in {result.seconds:.1f} s")
    return 0


def _spec_dict(spec: Any) -> dict[str, Any]:
    return {
        "architecture": spec.architecture,
        "groups": [
            {"name": g.name, "size": g.size, "kind": g.kind, "producers": list(g.producers),
             "consumers": list(g.consumers), "tensors": [[m.name, m.axis] for m in g.members]}
            for g in spec.groups
        ],
        "skipped": [{"name": s.name, "size": s.size, "kind": s.kind, "reason": s.reason} for s in spec.skipped],
    }


def _cmd_spec(args: argparse.Namespace) -> int:
    from ..coverage import permutation_coverage
    from ..spec import permutation_spec

    session = _Session(args)
    model = session.model(args.checkpoint)
    example = session.example_inputs(4)
    started = time.perf_counter()
    spec = permutation_spec(model, example)
    seconds = time.perf_counter() - started
    coverage = permutation_coverage(model, example, spec=spec, seed=args.seed, label=args.arch or str(args.checkpoint))
    _echo(spec.summary())
    _echo(
        f"coverage: {coverage.groups} groups, {100 * coverage.hidden_groups_permuted:.1f}% of hidden unit sets "
        f"permutable, {100 * coverage.params_changed:.1f}% of parameter elements moved by a random permutation, "
        f"max relative output difference {coverage.max_rel_diff:.2e}, spec built in {seconds:.2f} s"
    )
    if args.output_dir is not None:
        path = save_json({**_spec_dict(spec), "coverage": coverage.to_dict(), "spec_seconds": seconds},
                         Path(args.output_dir) / "spec.json")
        _wrote([path])
    return 0


def _pairs(args: argparse.Namespace, size: int, layer: str) -> list[tuple[int, int]]:
    """The unit pairs to swap: ``--neurons`` as pairs, or ``--num-swaps`` random disjoint pairs drawn by ``--seed``."""
    if args.neurons is not None:
        units = list(args.neurons)
        if len(units) % 2:
            raise PermutationError(f"--neurons takes pairs of units (I J [I J ...]), got {len(units)} numbers")
        if args.num_swaps not in (1, len(units) // 2):
            raise PermutationError(f"--num-swaps {args.num_swaps} disagrees with the {len(units) // 2} pair(s) of --neurons")
    else:
        if 2 * args.num_swaps > size:
            raise PermutationError(f"--num-swaps {args.num_swaps} needs {2 * args.num_swaps} units but {layer!r} has {size}")
        generator = torch.Generator().manual_seed(args.seed)
        units = [int(k) for k in torch.randperm(size, generator=generator)[: 2 * args.num_swaps]]
    if len(set(units)) != len(units):
        raise PermutationError(f"--neurons must name two different units per pair, all distinct, got {units}")
    bad = [u for u in units if not 0 <= u < size]
    if bad:
        raise PermutationError(f"unit {bad[0]} is out of range for {layer!r}, which has {size} units")
    return [(units[k], units[k + 1]) for k in range(0, len(units), 2)]


def _cmd_swap(args: argparse.Namespace) -> int:
    from ..neuronswap import layer_at_depth
    from ..permute import layer_group, permute, verify_equivalence
    from ..spec import permutation_spec

    session = _Session(args)
    model = session.model(args.checkpoint)
    example = session.example_inputs(4)
    spec = permutation_spec(model, example)
    layer = args.layer if args.layer is not None else layer_at_depth(model, args.depth, example, spec)
    group = layer_group(spec, layer)
    pairs = _pairs(args, group.size, layer)
    order = torch.arange(group.size)
    for i, j in pairs:
        order[i], order[j] = j, i
    swapped = permute(model, {group.name: order}, spec)
    folder = session.output_dir("results/swap")
    units = "_".join(f"{i}_{j}" for i, j in pairs) if len(pairs) == 1 else f"{len(pairs)}pairs_seed{args.seed}"
    stem = f"{Path(args.checkpoint).stem}_swap_{layer.replace('.', '-')}_{units}"
    path = Path(args.output) if args.output is not None else session.checkpoint_path(folder, stem, args.checkpoint)
    metadata: dict[str, Any] = {
        "source_checkpoint": str(args.checkpoint),
        "checkpoint": str(path),
        "arch": args.arch,
        "layer": layer,
        "depth": args.depth if args.layer is None else None,
        "group": group.name,
        "group_size": group.size,
        "num_swaps": len(pairs),
        "pairs": [list(p) for p in pairs],
        "neurons": [u for p in pairs for u in p],
        "tensors_moved": [m.name for m in group.members],
        "seed": args.seed,
    }
    if args.verify:
        if session.uses_data:
            _, test = session.loaders
            difference, count = verify_equivalence(model, swapped, data=test), len(session.split.test)
        else:
            inputs = session.example_inputs(256)
            difference, count = verify_equivalence(model, swapped, inputs), int(inputs.shape[0])
        metadata["verification"] = {"max_relative_difference": difference, "tolerance": args.tol,
                                    "passed": difference <= args.tol, "num_inputs": count}
        _echo(f"verify: max relative output difference {difference:.3e} on {count} inputs "
              f"({'equivalent' if difference <= args.tol else 'NOT equivalent'} at tolerance {args.tol:g})")
        if difference > args.tol:
            raise PermutationError(
                f"the swapped model differs from the original by {difference:.3e} > --tol {args.tol:g}"
            )
    written = [save_model(swapped, path, session.metadata())]
    written.append(save_json(metadata, path.with_name(f"{path.stem}_metadata.json")))
    swaps = ", ".join(f"{i}<->{j}" for i, j in pairs)
    _echo(f"swapped units {swaps} of {layer!r} (group {group.name!r}, {group.size} units, "
          f"{len(group.members)} tensors moved)")
    _wrote(written)
    return 0
