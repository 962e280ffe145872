"""``fusion merge-yaml``: merge fine-tunes of one base from a mergekit-style YAML file."""


from __future__ import annotations

import argparse
import time

from .options import _positive_int


def add_merge_yaml(commands: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    """Register ``merge-yaml`` on the ``fusion`` subcommands."""
    help_text = ("merge fine-tunes of one base from a mergekit-style YAML config (task_arithmetic, ties, dare_linear, "
                 "dare_ties, breadcrumbs, model_stock, slerp, linear, passthrough slices); writes a Hugging Face folder, "
                 "out of core and atomically")
    sub = commands.add_parser("merge-yaml", help=help_text, description=help_text, formatter_class=formatter,
                              allow_abbrev=False)
    sub.add_argument("merge_config", metavar="CONFIG", help="YAML merge configuration (mergekit syntax)")
    sub.add_argument("out_path", help="output model folder (replaced only when the merge succeeds)")
    sub.add_argument("--device", default="cpu", help="where tensors are merged, e.g. cuda (default cpu)")
    sub.add_argument("--max-shard-size", "--out-shard-size", default="5GB", dest="max_shard_size",
                     help="largest output shard, e.g. 5GB or 500MB (default 5GB)")
    sub.add_argument("--seed", "--random-seed", type=int, default=0, dest="seed",
                     help="seed of random sparsification (DARE); equals mergekit-yaml's --random-seed")
    sub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sub.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    sub.set_defaults(func=_cmd_merge_yaml, subparser=sub)


def _cmd_merge_yaml(args: argparse.Namespace) -> int:
    from ..merging import load_config, merge_yaml  # imported when the command runs: --help stays fast
    from .session import _echo

    start = time.perf_counter()
    config = load_config(args.merge_config)
    out = merge_yaml(args.merge_config, args.out_path, device=args.device, max_shard_size=args.max_shard_size,
                     seed=args.seed, progress=not args.quiet)
    _echo(f"merged {len(config.referenced_models())} models with {config.method.name} into {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
