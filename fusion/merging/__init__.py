"""Merging fine-tunes of one base: task arithmetic, TIES, DARE, breadcrumbs, Model Stock, SLERP, linear.

Two entry points share one per-tensor engine:

* :func:`merge_task_vectors` merges ``nn.Module``s in memory (optionally aligning each fine-tune to
  the base's basis first, for members whose hidden units were permuted);
* :func:`merge_yaml` (the ``fusion merge-yaml`` command) reads a mergekit-style YAML file and merges
  models on disk out of core: tensors are read lazily from memory-mapped safetensors, merged one
  at a time and written shard by shard into a Hugging Face folder.

Methods, parameter names, defaults and numerics follow mergekit, so that both give the same
tensors (see ``tests/test_merging_parity.py``).
"""

from __future__ import annotations

from .api import merge_task_vectors
from .config import MergeConfig, load_config, parse_config
from .methods import METHODS, MergeMethod
from .run import merge_yaml
from .sources import TensorSource
from .writer import ShardWriter, atomic_folder

__all__ = ["METHODS", "MergeConfig", "MergeMethod", "ShardWriter", "TensorSource", "atomic_folder", "load_config",
           "merge_task_vectors", "merge_yaml", "parse_config"]
