"""Lazy, read-only access to the tensors of a model on disk.

A model is a Hugging Face folder (``save_pretrained``: ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, or ``pytorch_model.bin`` files), a single ``.safetensors`` file or
a torch checkpoint (``torch.save`` of a state dict). Nothing is ever downloaded.

Safetensors files are opened once: their header (names, dtypes, shapes, byte ranges) is read, and a
tensor's bytes are read with one positioned read only when it is asked for. This is deliberately not
a memory map: pages of a mapped file that were touched stay in the process's resident set while the
file is mapped, so merging N memory-mapped models tensor by tensor would still show N models' worth
of resident memory. Torch checkpoints are loaded with ``torch.load(mmap=True, weights_only=True)``
(pickles have no byte index to read from).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import _unwrap
from ..errors import CheckpointError

__all__ = ["TensorSource"]

_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class _SafetensorsFile:
    """One ``.safetensors`` file: its header, and positioned reads of single tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - kept open for the merge, closed by close()
            (length,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"cannot read {str(path)!r} as safetensors: {exc}") from exc
        self._data = 8 + length
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                start, end = info["data_offsets"]
                self.entries[name] = (_DTYPES[info["dtype"]], tuple(info["shape"]), start, end)
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{str(path)!r}: malformed header entry for {name!r} ({exc})") from exc

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, start, end = self.entries[name]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buffer.numpy()) if end > start else memoryview(bytearray())
        read = os.preadv(self._file.fileno(), [view], self._data + start) if end > start else 0
        if read != end - start:
            raise CheckpointError(f"{str(self.path)!r} is truncated: tensor {name!r} needs bytes {start}..{end}")
        return buffer.view(dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()


class TensorSource:
    """The tensors of one model, read one at a time.

    Args:
        path: a model folder, a ``.safetensors`` file or a torch checkpoint.

    Attributes:
        path: the path given.
        config: the folder's ``config.json`` (None for single files or when absent).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config: dict[str, Any] | None = None
        self._files: dict[str, Path] = {}  # tensor name -> file holding it
        self._handles: dict[Path, Any] = {}
        self._torch_state: dict[str, torch.Tensor] | None = None
        if not self.path.exists():
            raise CheckpointError(f"model {str(self.path)!r} does not exist (models are local folders or checkpoint files; "
                                  "nothing is downloaded)")
        if self.path.is_dir():
            self._open_folder()
        elif self.path.suffix == ".safetensors":
            self._index_safetensors([self.path])
        else:
            self._load_torch(self.path)

    def _open_folder(self) -> None:
        config = self.path / "config.json"
        if config.is_file():
            try:
                self.config = json.loads(config.read_text())
            except ValueError as exc:
                raise CheckpointError(f"{str(config)!r} is not valid JSON: {exc}") from exc
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise CheckpointError(f"{str(index)!r} is not a shard index (no 'weight_map'): {exc}") from exc
                files = sorted({self.path / f for f in weight_map.values()})
                if index_name.startswith("model.safetensors"):
                    self._index_safetensors(files)
                else:
                    for file in files:
                        self._load_torch(file)
                return
        single = self.path / "model.safetensors"
        if single.is_file():
            self._index_safetensors([single])
            return
        for candidate in ("pytorch_model.bin", "model.pt", "model.pth"):
            if (self.path / candidate).is_file():
                self._load_torch(self.path / candidate)
                return
        raise CheckpointError(f"model folder {str(self.path)!r} holds no model.safetensors(.index.json) or "
                              "pytorch_model.bin")

    def _index_safetensors(self, files: list[Path]) -> None:
        for file in files:
            self._handles[file] = handle = _SafetensorsFile(file)
            for name in handle.entries:
                self._files[name] = file

    def _load_torch(self, file: Path) -> None:
        if file.suffix not in _TORCH_SUFFIXES and not file.is_file():
            raise CheckpointError(f"{str(file)!r} is not a .safetensors file or torch checkpoint")
        try:
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            raise CheckpointError(f"cannot read checkpoint {str(file)!r} ({reason})") from exc
        state = _unwrap(obj, file)
        self._torch_state = {**(self._torch_state or {}), **state}
        for name in state:
            self._files[name] = file

    @property
    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (a fresh tensor on ``device``, converted to ``dtype`` when given)."""
        if name not in self._files:
            raise CheckpointError(f"model {str(self.path)!r} has no tensor {name!r}")
        if self._torch_state is not None and name in self._torch_state:
            tensor = self._torch_state[name]
        else:
            tensor = self._handles[self._files[name]].read(name)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor, read from the file header (no data is read)."""
        if self._torch_state is not None and name in self._torch_state:
            return tuple(self._torch_state[name].shape)
        return self._handles[self._files[name]].entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        """The dtype of a tensor, read from the file header (no data is read)."""
        if self._torch_state is not None and name in self._torch_state:
            return self._torch_state[name].dtype
        return self._handles[self._files[name]].entries[name][0]

    def close(self) -> None:
        """Close the files."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._torch_state = None

    def __repr__(self) -> str:
        return f"TensorSource({str(self.path)!r}, {len(self._files)} tensors)"
