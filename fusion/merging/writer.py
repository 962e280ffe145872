"""Writing a merged model as a Hugging Face folder, shard by shard, atomically.

:class:`ShardWriter` streams each tensor to its shard as soon as it is merged (the layout, and so
every shard's header, is fixed in advance), so no shard is ever buffered in memory. The whole
folder is built in a hidden temporary folder next to the destination and renamed into place only
when :func:`atomic_folder` exits normally; on any error the temporary folder is removed and an
existing destination is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

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


_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}

Layout = Sequence[tuple[str, torch.dtype, tuple[int, ...]]]


class ShardWriter:
    """Stream tensors into safetensors shards whose layout is fixed before the first byte is written.

    The names, dtypes and shapes of all tensors, in writing order, are known up front (from the
    inputs' headers), so each shard's header is written when the shard is started and every tensor's
    bytes go straight to disk when it is added: nothing but the tensor being written is held. Shards
    hold at most ``max_shard_bytes`` of tensor data (a larger single tensor gets a shard of its own);
    one shard is ``model.safetensors``, several are ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``.
    """

    def __init__(self, folder: Path, layout: Layout, max_shard_bytes: int = 5 * 10**9,
                 metadata: Mapping[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._layout = list(layout)
        shards: list[list[int]] = [[]]
        used = 0
        for i, (_, dtype, shape) in enumerate(self._layout):
            size = _nbytes(dtype, shape)
            if shards[-1] and used + size > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(i)
            used += size
        count = len(shards)
        names = (["model.safetensors"] if count == 1 else
                 [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)])
        self.paths = [self.folder / name for name in names]
        self._shard_of = {i: k for k, members in enumerate(shards) for i in members}
        self._shards = shards
        self._next = 0
        self._handle: Any = None
        self.total_bytes = sum(_nbytes(d, s) for _, d, s in self._layout)

    def _header(self, shard: int) -> bytes:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for i in self._shards[shard]:
            name, dtype, shape = self._layout[i]
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the layout (it must match its name, dtype and shape)."""
        if self._next >= len(self._layout):
            raise CheckpointError(f"tensor {name!r} is not in the output layout (all {len(self._layout)} written)")
        expected, dtype, shape = self._layout[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected, dtype, shape):
            raise CheckpointError(f"expected tensor {expected!r} {dtype} {list(shape)} next, got {name!r} {tensor.dtype} "
                                  f"{list(tensor.shape)}")
        shard = self._shard_of[self._next]
        if self._handle is None:
            self._handle = open(self.paths[shard], "wb")  # noqa: SIM115 - closed when the shard is complete
            self._handle.write(self._header(shard))
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1
        if self._next == len(self._layout) or self._shard_of[self._next] != shard:
            self._handle.close()
            self._handle = None

    def finish(self) -> list[Path]:
        """Check that every tensor was written and write the index (several shards); returns the shard paths."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._next != len(self._layout):
            raise CheckpointError(f"only {self._next} of {len(self._layout)} tensors were written")
        if not self._layout:
            (self.folder / "model.safetensors").write_bytes(self._header(0))
        if len(self.paths) > 1:
            weight_map = {self._layout[i][0]: self.paths[k].name for k, members in enumerate(self._shards) for i in members}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.paths


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()
