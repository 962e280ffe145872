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
from .session import _echo, _Session, _test_inputs, _wrote


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
        "skipped": [{"name": s.name, "size": s.size, "reason": s.reason} for s in spec.skipped],
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


def _depth_layer(spec: Any, depth: str) -> str:
    """The layer producing the first / middle / last permutable channel group (convolutions preferred)."""
    groups = [g for g in spec.groups if g.kind == "channels"]
    if not groups:
        raise PermutationError("the model has no permutable layer")
    layers = [g.name if g.name in g.producers else g.producers[0] for g in groups]
    index = {"early": 0, "mid": len(layers) // 2, "late": len(layers) - 1}[depth]
    return layers[index]


def _cmd_swap(args: argparse.Namespace) -> int:
    from ..permute import swap_neurons, verify_equivalence
    from ..spec import permutation_spec

    session = _Session(args)
    model = session.model(args.checkpoint)
    spec = permutation_spec(model, session.example_inputs(4))
    layer = args.layer if args.layer is not None else _depth_layer(spec, args.depth)
    group = spec.group_of_layer(layer)
    if args.neurons is not None:
        i, j = args.neurons
    else:
        generator = torch.Generator().manual_seed(args.seed)
        i, j = (int(k) for k in torch.randperm(group.size, generator=generator)[:2])
    if i == j:
        raise PermutationError(f"--neurons must name two different units, got {i} and {j}")
    swapped = swap_neurons(model, layer, i, j, spec=spec)
    folder = session.output_dir("results/swap")
    stem = f"{Path(args.checkpoint).stem}_swap_{layer.replace('.', '-')}_{i}_{j}"
    path = Path(args.output) if args.output is not None else session.checkpoint_path(folder, stem, args.checkpoint)
    metadata: dict[str, Any] = {
        "source_checkpoint": str(args.checkpoint),
        "checkpoint": str(path),
        "arch": args.arch,
        "layer": layer,
        "depth": args.depth if args.layer is None else None,
        "group": group.name,
        "group_size": group.size,
        "neurons": [i, j],
        "tensors_moved": [m.name for m in group.members],
        "seed": args.seed,
    }
    if args.verify:
        inputs = session.example_inputs(256) if not session.uses_data else _test_inputs(session, 512)
        difference = verify_equivalence(model, swapped, inputs)
        metadata["verification"] = {"max_relative_difference": difference, "tolerance": args.tol,
                                    "passed": difference <= args.tol, "num_inputs": int(inputs.shape[0])}
        _echo(f"verify: max relative output difference {difference:.3e} on {inputs.shape[0]} inputs "
              f"({'equivalent' if difference <= args.tol else 'NOT equivalent'} at tolerance {args.tol:g})")
        if difference > args.tol:
            raise PermutationError(
                f"the swapped model differs from the original by {difference:.3e} > --tol {args.tol:g}"
            )
    written = [save_model(swapped, path, session.metadata())]
    written.append(save_json(metadata, path.with_name(f"{path.stem}_metadata.json")))
    _echo(f"swapped units {i} and {j} of {layer!r} (group {group.name!r}, {group.size} units, "
          f"{len(group.members)} tensors moved)")
    _wrote(written)
    return 0


