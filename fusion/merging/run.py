"""Running a merge out of core: tensor by tensor from memory-mapped inputs to a sharded folder.

Only the tensors of the output weight being merged (one per input) and the current output shard
are in memory at any time, so merging N models of size S needs about ``N * largest tensor +
shard size`` of RAM, not ``N * S``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ..analysis.io import json_text
from ..errors import CheckpointError, DeviceMismatchError, NonFiniteWeightsError
from ..progress import tqdm
from .config import MergeConfig, load_config
from .methods import MergeInputs, MergeMethod
from .plan import MergeTask, Source, plan_merge
from .sources import TensorSource
from .writer import ShardWriter, atomic_folder, parse_size

__all__ = ["execute_tasks", "merge_yaml"]

logger = logging.getLogger(__name__)


def _release_freed_memory() -> None:
    """Return freed heap memory to the operating system (glibc only; a no-op elsewhere).

    glibc serves allocations below its adaptive mmap threshold (up to 32 MB) from the heap and
    keeps freed heap pages, so a long tensor-by-tensor merge would otherwise see its resident set
    creep up to the sum of many tensors it no longer holds.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """``tensor``, checked to hold no NaN/inf (one fused min/max pass, which NaN propagates through;
    an order of magnitude faster than ``isfinite(...).all()`` on the CPU)."""
    if tensor.is_floating_point() and tensor.numel():
        low, high = torch.aminmax(tensor)
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            raise NonFiniteWeightsError(f"{what} holds NaN or infinite values")
    return tensor


def execute_tasks(tasks: Sequence[MergeTask], sources: Mapping[str, Source], method: MergeMethod, *,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  out_dtype: torch.dtype | None = None, seed: int = 0, progress: bool = False,
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(output name, merged tensor)`` for each task, in order, reading inputs lazily.

    Inputs are read onto ``device`` (converted to ``dtype`` when given, else to the promoted dtype
    of the inputs), checked to be finite, and merged by ``method``'s kernel; non-floating tensors
    (integer buffers) are copied from the first input. Random sparsification (DARE) draws from one
    generator seeded with ``seed``, consumed in task order, input by input.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for task in tqdm(tasks, desc=f"merge ({method.name})", unit="tensor", disable=not progress):
        tensors = [_finite(sources[m].get(n, device, dtype), f"tensor {n!r} of model {m!r}")
                   for m, n in zip(task.models, task.inputs)]
        if not tensors[0].is_floating_point():
            merged = tensors[0]
        else:
            common = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
            tensors = [t.to(common) for t in tensors]
            merged = method.kernel(MergeInputs(tensors, task.has_base, task.shared, task.per_input, generator))
            _finite(merged, f"the merged tensor {task.output!r} ({method.name})")
        del tensors
        if out_dtype is not None and merged.is_floating_point():
            merged = merged.to(out_dtype)
        yield task.output, merged
        del merged
        _release_freed_memory()


def _layout(tasks: Sequence[MergeTask], sources: Mapping[str, TensorSource], config: MergeConfig) -> list[tuple]:
    """Name, dtype and shape of every output tensor, from the inputs' headers (as :func:`execute_tasks`
    will produce them: the promoted floating dtype, or ``out_dtype``; non-floating tensors keep theirs)."""
    layout = []
    for task in tasks:
        dtypes = [config.dtype or sources[m].dtype(n) for m, n in zip(task.models, task.inputs)]
        dtype = dtypes[0]
        if dtype.is_floating_point:
            for other in dtypes[1:]:
                dtype = torch.promote_types(dtype, other)
            dtype = config.out_dtype or dtype
        layout.append((task.output, dtype, sources[task.models[0]].shape(task.inputs[0])))
    return layout


def _check_device(device: str | torch.device) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceMismatchError(f"unknown device {device!r}: {exc}") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise DeviceMismatchError(f"device {device!r} was asked for but CUDA is not available")


def _resolve_model(name: str, config_dir: Path | None) -> Path:
    for candidate in (Path(name), *([config_dir / name] if config_dir else [])):
        if candidate.exists():
            return candidate
    raise CheckpointError(f"model {name!r} is not a local folder or checkpoint file (relative paths are tried from the "
                          "working folder and the config's folder; nothing is downloaded)")


def _readme(config: MergeConfig, models: Sequence[str], text: str) -> str:
    method = config.method
    lines = [f"# Merged model ({method.title})", "",
             f"Merged with `fusion merge-yaml` using **{method.name}** ({method.paper}).", ""]
    if config.base_model:
        lines += [f"Base model: `{config.base_model}`", ""]
    lines += ["Inputs:", "", *[f"- `{m}`" for m in models], "", "Configuration:", "", "```yaml", text.rstrip(), "```", ""]
    return "\n".join(lines)


def merge_yaml(config: str | os.PathLike | MergeConfig, out_path: str | os.PathLike, *, device: str = "cpu",
               max_shard_size: str | int = "5GB", seed: int = 0, progress: bool = False) -> Path:
    """Merge the models a mergekit-style YAML configuration names and write a Hugging Face folder.

    The folder holds ``model.safetensors`` (or shards of at most ``max_shard_size`` with
    ``model.safetensors.index.json``), the base's (else the first model's) ``config.json`` (with
    ``num_hidden_layers`` updated for slices), ``mergekit_config.yml`` and a README naming the
    method and the inputs. The folder appears only when everything is written; on any error
    nothing is left behind and an existing folder is untouched.

    Args:
        config: the path of a YAML file (relative model paths are tried from the working folder,
            then from the file's folder) or a parsed :class:`MergeConfig`.
        out_path: the output folder.
        device: where tensors are merged (``"cuda"`` to merge on the GPU; each input tensor is
            read from its file and moved there, the result is moved back to be written).
        max_shard_size: the largest output shard (``"5GB"``, ``"500MB"`` or bytes).
        seed: seed of random sparsification (DARE).
        progress: show a progress bar.

    Returns:
        The output folder.
    """
    _check_device(device)
    config_dir = None
    if not isinstance(config, MergeConfig):
        config_dir = Path(config).resolve().parent
        config = load_config(config)
    shard_bytes = parse_size(max_shard_size)
    paths = {name: _resolve_model(name, config_dir) for name in config.referenced_models()}
    sources: dict[str, TensorSource] = {}
    for note in config.notes:
        logger.warning("%s", note)
    try:
        for name, path in paths.items():
            sources[name] = TensorSource(path)
        tasks, out_layers = plan_merge(config, sources)
        first = config.base_model or config.referenced_models()[0]
        with atomic_folder(out_path) as tmp:
            writer = ShardWriter(tmp, _layout(tasks, sources, config), shard_bytes)
            for name, tensor in execute_tasks(tasks, sources, config.method, device=device, dtype=config.dtype,
                                              out_dtype=config.out_dtype, seed=seed, progress=progress):
                writer.add(name, tensor)
            writer.finish()
            model_config = sources[first].config
            if model_config is not None:
                model_config = dict(model_config)
                if out_layers is not None:
                    key = "num_hidden_layers" if "num_hidden_layers" in model_config else "n_layer"
                    model_config[key] = out_layers
                (tmp / "config.json").write_text(json_text(model_config))
            (tmp / "mergekit_config.yml").write_text(config.text)
            (tmp / "README.md").write_text(_readme(config, list(paths), config.text))
    finally:
        for source in sources.values():
            source.close()
    return Path(out_path)

