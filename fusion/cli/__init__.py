"""The ``fusion`` command line (also ``python -m fusion``).

Subcommands (``fusion <command> --help`` for their options):

* ``demo``: train, align and fuse small models on the embedded digits data and print a comparison;
* ``spec``: print a model's permutation groups and how much of it they cover;
* ``swap``: swap pairs of neurons of a layer (function-preserving; ``--num-swaps N`` random pairs, a layer
  by name or by ``--depth early|mid|late``), verify it on the whole test split (``--no-verify`` skips),
  save the model and a metadata JSON;
* ``align``: align model B to model A (weight / activation matching, optimal transport);
* ``fuse``: fuse models (average, merge, merge-repair, ot, transplant);
* ``interpolate`` (alias ``barrier``): loss and accuracy along the straight line, naive and aligned;
* ``distances``: per-layer weight distances between two models;
* ``curve``: train a Bézier curve between two models and analyse it (npz, summary, heatmap, GIF);
  ``--config curve.yaml`` gives epochs, lr, weight_decay, bends, seed, ...;
* ``analyze-curve``: analyse a saved curve again (``--curve-checkpoint``, ``--original-checkpoint``,
  ``--swap-metadata``): the same npz and JSON as ``curve``;
* ``plot``: re-plot saved results (``--output FILE`` for one plot, ``--heatmap`` with a GIF).

Models are named by ``--arch``: a reference model of :mod:`fusion.models` (``mlp``, ``vgg``,
``resnet``), a torchvision name (``resnet18`` with ``--num-classes``) or ``module:Class``; their
checkpoints are ``torch.save`` state dicts or ``.safetensors`` files (see :mod:`fusion.checkpoint`).
Reference models take their input size and class count from the data set unless ``--arch-kwargs``
says otherwise. Results are written atomically to ``--output-dir``.

Options are never abbreviated (``--output`` is not ``--output-dir``). Bad input (a missing
checkpoint, an unknown architecture, an unreadable file, an absent data folder) prints one line,
``fusion: error: ...``, to stderr and exits with status 1; usage errors exit with 2.
"""

from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
