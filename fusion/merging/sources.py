"""Lazy, read-only access to the tensors of a model on disk.

A model is a Hugging Face folder (``save_pretrained``: ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, or ``pytorch_model.bin`` files), a single ``.safetensors`` file or
a torch checkpoint (``torch.save`` of a state dict). Safetensors files are memory-mapped with
``safetensors.safe_open`` and a tensor is read only when asked for; torch checkpoints are loaded
with ``torch.load(mmap=True, weights_only=True)``, which maps the storage instead of reading it.
Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import _unwrap
from ..errors import CheckpointError

__all__ = ["TensorSource"]

_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


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
        from safetensors import SafetensorError, safe_open

        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"cannot read {str(file)!r}: {exc}") from exc
            self._handles[file] = handle
            for name in handle.keys():
                self._files[name] = file

    def _load_torch(self, file: Path) -> None:
        if file.suffix not in _TORCH_SUFFIXES and not file.is_file():
            raise CheckpointError(f"{str(file)!r} is not a .safetensors file or torch checkpoint")
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
            raise CheckpointError(f"cannot read checkpoint {str(file)!r}: {' '.join(str(exc).split())[:200]}") from exc
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
            tensor = self._handles[self._files[name]].get_tensor(name)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor, read from the file header (no data is read)."""
        if self._torch_state is not None and name in self._torch_state:
            return tuple(self._torch_state[name].shape)
        return tuple(self._handles[self._files[name]].get_slice(name).get_shape())

    def close(self) -> None:
        """Release the memory maps."""
        self._handles.clear()
        self._torch_state = None

    def __repr__(self) -> str:
        return f"TensorSource({str(self.path)!r}, {len(self._files)} tensors)"
