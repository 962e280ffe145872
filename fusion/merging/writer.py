"""Writing a merged model as a Hugging Face folder, shard by shard, atomically.

:class:`ShardWriter` buffers tensors until the next one would exceed ``max_shard_bytes``, then
writes the buffer as one safetensors shard, so at most one shard's worth of tensors is held. The
whole folder is built in a hidden temporary folder next to the destination and renamed into place
only when :func:`atomic_folder` exits normally; on any error the temporary folder is removed and an
existing destination is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["ShardWriter", "atomic_folder", "parse_size"]

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"2GiB"`` or a plain integer."""
    if isinstance(text, int):
        return text
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise CheckpointError(f"cannot read size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise CheckpointError(f"size {text!r} must be positive")
    return int(value)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` when the body succeeds (and vanishes if not)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot write the model folder {str(target)!r}: a file of that name exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Write tensors into ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes``
    (a single ``model.safetensors`` when everything fits in one) plus the index JSON."""

    def __init__(self, folder: Path, max_shard_bytes: int = 5 * 10**9, metadata: Mapping[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (moved to the CPU, made contiguous); flushes a full shard first."""
        if name in self._buffer or any(name in names for _, names in self._shards):
            raise CheckpointError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self._shards) + 1}.safetensors"
        save_file(self._buffer, str(path), metadata=self.metadata)
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, name the shards ``-of-n`` and write the index; returns the shard paths."""
        if self._buffer or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final = [self.folder / "model.safetensors"]
        else:
            final = [self.folder / f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        weight_map = {}
        for (path, names), target in zip(self._shards, final):
            os.replace(path, target)
            weight_map.update({name: target.name for name in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final
