"""Atomic writing and reading of analysis results (``.npz`` arrays, JSON summaries, figures).

Every file the analysis layer writes goes through :func:`atomic_path`: the content is first
written to a hidden temporary file in the destination folder and then moved over the
destination with :func:`os.replace`, so a crash or an exception mid-write never leaves a
half-written result, and an existing file is either fully replaced or left as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, DataError

__all__ = ["atomic_path", "json_text", "load_json", "load_npz", "save_json", "save_npz", "to_jsonable", "write_text"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path`` atomically.

    The temporary file keeps ``path``'s suffix, so writers that infer the format from the
    name (matplotlib, Pillow) behave as for ``path`` itself. The parent folder is created if
    needed. The result gets the permissions a plain ``open(path, "w")`` gives: a new file
    ``0o666`` minus the umask, an existing one its own mode.
    If the body raises, the temporary file is removed and ``path`` is untouched.

    Example:
        >>> with atomic_path("out/summary.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    target = Path(path)
    if target.is_dir():
        raise CheckpointError(f"cannot write {str(target)!r}: it is a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    except OSError as exc:
        raise CheckpointError(f"cannot write {str(target)!r}: {exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _plain_file_mode(target))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    logger.debug("wrote %s", target)


def _current_umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (briefly process-wide) and restore it
    os.umask(mask)
    return mask


def _plain_file_mode(target: Path) -> int:
    """The permissions ``open(target, "w")`` would leave: an existing file keeps its mode, a new one
    gets ``0o666`` minus the umask (``mkstemp`` creates owner-only 0600 files)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_current_umask()


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, paths and tuples (nested) into plain JSON types.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` so the result is
    strict JSON.
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def json_text(obj: Any) -> str:
    """``obj`` (converted by :func:`to_jsonable`) as indented strict JSON text.

    Raises:
        DataError: if ``obj`` holds something JSON cannot represent.
    """
    try:
        return json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise DataError(f"cannot write as JSON: {exc}") from exc


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_json(obj: Any, path: PathLike) -> Path:
    """Write ``obj`` as indented JSON (see :func:`json_text`), atomically.

    Returns:
        The path written.
    """
    return write_text(path, json_text(obj))


def load_json(path: PathLike) -> Any:
    """Read a JSON file written by :func:`save_json` (raises :class:`DataError` if unreadable)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read JSON file {str(path)!r}: {exc}") from exc


def save_npz(path: PathLike, arrays: Mapping[str, Any]) -> Path:
    """Write ``arrays`` (name -> array-like) to an uncompressed ``.npz`` file, atomically.

    Unlike :func:`numpy.savez`, the file name is used exactly as given (no ``.npz`` appended).
    """
    converted = {name: np.asarray(value) for name, value in arrays.items()}
    for name, array in converted.items():
        if array.dtype == object:
            raise DataError(f"array {name!r} for {str(path)!r} has dtype object and cannot be saved")
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **converted)
    return Path(path)


def load_npz(path: PathLike, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` file into a dict, checking that ``required`` names exist.

    Raises:
        DataError: if the file is missing, unreadable or lacks a required array.
    """
    try:
        with np.load(Path(path), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read .npz file {str(path)!r}: {exc}") from exc
    missing = [name for name in required if name not in arrays]
    if missing:
        raise DataError(f"{str(path)!r} lacks the array(s) {missing}; it holds {sorted(arrays)}")
    return arrays
