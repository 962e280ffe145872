"""Data sets for tests, experiments and the CLI, all read offline (nothing is ever downloaded).

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside scikit-learn),
  split, standardised with train statistics and optionally upsampled for CNNs: the data set every
  test and quick experiment runs on.
* ``mnist1d``: Greydanus's MNIST-1D (2020), a 1-D analogue of MNIST whose 40-sample signals are
  generated procedurally by the ``mnist1d`` package (never downloaded) and cached as ``.npz``: a
  benchmark with headroom (MLPs reach about 68%, CNNs about 94%), where fusion methods can be told apart.
* ``cifar10``, ``cifar100``, ``mnist``: read by torchvision from a local folder in the layout of
  the official archives; a missing folder or file raises :class:`~fusion.errors.DataError` that
  names the folder and the files expected in it.

Example:
    >>> split = load_digits_data(seed=0, image_size=16)
    >>> train_loader, test_loader = make_loaders(split, batch_size=64)
    >>> split.input_shape
    (1, 16, 16)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .analysis.io import load_npz, save_npz
from .errors import DataError, FusionError

__all__ = [
    "DATASETS",
    "DataSplit",
    "example_batch",
    "get_data",
    "load_dataset",
    "load_digits_data",
    "load_mnist1d_data",
    "make_loaders",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSplit:
    """A train/test pair of one data set.

    Attributes:
        train: training samples; each item is ``(input, label)`` with input of shape ``input_shape``.
        test: held-out samples in the same format.
        num_classes: number of labels.
        input_shape: shape of one input, without the batch dimension, e.g. ``(1, 8, 8)``.
        name: the data set's name (``"digits"``, ``"cifar10"``, ...).
    """

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str


@dataclass(frozen=True)
class _LocalLayout:
    """Where torchvision expects one data set's files below ``data_root``."""

    folder: str  # relative to data_root
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]  # per-channel normalisation constants of the training set
    std: tuple[float, ...]


_CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_LAYOUTS: dict[str, _LocalLayout] = {
    "cifar10": _LocalLayout(
        "cifar-10-batches-py", (*_CIFAR10_BATCHES, "batches.meta"), ("test_batch", "batches.meta"), 10,
        (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _LocalLayout(
        "cifar-100-python", ("train", "meta"), ("test", "meta"), 100,
        (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
    ),
    "mnist": _LocalLayout(
        os.path.join("MNIST", "raw"),
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        10, (1, 28, 28), (0.1307,), (0.3081,),
    ),
}

#: Names accepted by :func:`get_data`.
DATASETS: tuple[str, ...] = ("digits", "mnist1d", *_LAYOUTS)


def load_digits_data(
    seed: int = 0,
    test_fraction: float = 0.25,
    image_size: int | None = None,
    flatten: bool = False,
    device: torch.device | str | None = None,
) -> DataSplit:
    """scikit-learn's 8x8 digits as a stratified train/test split of standardised float tensors.

    Pixels are standardised to mean 0 and standard deviation 1 with the (scalar) statistics of the
    training images, after any resizing, so the test split is standardised with train statistics.

    Args:
        seed: seed of the stratified split.
        test_fraction: share of the 1,797 images held out for testing, in (0, 1).
        image_size: if given, images are bilinearly resized from 8x8 to ``image_size`` x ``image_size``.
        flatten: return inputs as vectors of ``side * side`` features (64 by default) for MLPs
            instead of ``(1, side, side)`` images.
        device: where to put the tensors (default CPU).

    Returns:
        A :class:`DataSplit` of :class:`~torch.utils.data.TensorDataset` (inputs float32 of shape
        ``(n, 1, side, side)`` or ``(n, side * side)``, labels int64 of shape ``(n,)``).

    Raises:
        DataError: ``test_fraction`` outside (0, 1) or ``image_size`` not a positive integer.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive integer or None, got {image_size!r}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8)  # (1797, 1, 8, 8)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)  # (1797,)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))), test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    if image_size is not None and image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    side = images.shape[-1]
    train_x, test_x = images[train_idx], images[test_idx]
    mean, std = train_x.mean(), train_x.std()
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    if flatten:
        train_x, test_x = train_x.flatten(1), test_x.flatten(1)
    input_shape = (side * side,) if flatten else (1, side, side)
    device = torch.device("cpu") if device is None else torch.device(device)
    return DataSplit(
        train=TensorDataset(train_x.to(device), labels[train_idx].to(device)),
        test=TensorDataset(test_x.to(device), labels[test_idx].to(device)),
        num_classes=10,
        input_shape=input_shape,
        name="digits",
    )


#: Seed of the MNIST-1D data set the ``mnist1d`` package (and its paper) use.
MNIST1D_SEED = 42


def _mnist1d_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, else ``$FUSION_CACHE/mnist1d``, else ``~/.cache/fusion/mnist1d``."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("FUSION_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fusion") / "mnist1d"


@contextlib.contextmanager
def _isolated_numpy_rng():
    """Run a block that seeds NumPy's and Python's global generators, then restore both."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _generate_mnist1d(num_samples: int, train_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """MNIST-1D from the package's procedural generator (its default transform arguments, no download)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError("the mnist1d data set needs the 'mnist1d' package (pip install mnist1d)") from exc
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_fraction, seed
    with _isolated_numpy_rng():
        data = make_dataset(args)
    return {"x": data["x"].astype(np.float32), "y": data["y"].astype(np.int64),
            "x_test": data["x_test"].astype(np.float32), "y_test": data["y_test"].astype(np.int64)}


def load_mnist1d_data(
    num_samples: int = 5000,
    train_fraction: float = 0.8,
    seed: int = MNIST1D_SEED,
    flatten: bool = False,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> DataSplit:
    """MNIST-1D (Greydanus 2020): 10 classes of 40-sample 1-D signals, generated procedurally.

    The signals come from the ``mnist1d`` package's generator with its default transform arguments
    (template length 12, padding 36-60, shear 0.75, correlated noise 0.25, ...) and its
    standardisation (mean 0, std 1 over all generated samples). ``num_samples=5000`` with
    ``seed=42`` is the package's standard 4000/1000 split; ``num_samples=12500`` gives 10,000
    training signals. The first call generates (a few seconds) and caches the result as an
    ``.npz`` file named by the arguments and the package version (written atomically); later
    calls read the cache. NumPy's and Python's global random generators are left as they were.

    Args:
        num_samples: signals generated in all (a multiple of 10 is used: the generator makes
            ``num_samples // 10`` per class).
        train_fraction: share of the (shuffled) signals used for training, in (0, 1).
        seed: seed of the generator (42: the package's and the paper's data set).
        flatten: inputs as vectors ``(40,)`` instead of one-channel signals ``(1, 40)``.
        cache_dir: folder of the cache (default ``$FUSION_CACHE/mnist1d`` or ``~/.cache/fusion/mnist1d``).
        device: where to put the tensors (default CPU).

    Returns:
        A :class:`DataSplit` of :class:`~torch.utils.data.TensorDataset` (inputs float32 of shape
        ``(n, 1, 40)`` or ``(n, 40)``, labels int64).

    Raises:
        DataError: ``num_samples`` below 20, ``train_fraction`` outside (0, 1), or an unreadable cache.
    """
    from importlib.metadata import PackageNotFoundError, version

    if not isinstance(num_samples, int) or num_samples < 20:
        raise DataError(f"num_samples must be an integer of at least 20 (2 per class), got {num_samples!r}")
    if not 0.0 < float(train_fraction) < 1.0:
        raise DataError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    try:
        package = version("mnist1d")
    except PackageNotFoundError:  # pragma: no cover - depends on the environment
        package = "unknown"
    key = json.dumps({"n": num_samples, "train": float(train_fraction), "seed": int(seed), "mnist1d": package},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = _mnist1d_cache_dir(cache_dir) / f"mnist1d_n{num_samples}_seed{seed}_{digest}.npz"
    if path.is_file():
        arrays = load_npz(path, required=("x", "y", "x_test", "y_test"))
    else:
        arrays = _generate_mnist1d(num_samples, float(train_fraction), int(seed))
        try:
            save_npz(path, arrays)
        except FusionError as exc:  # a read-only cache folder costs time, not the data
            logger.warning("mnist1d: could not cache the data set at %s: %s", path, exc)
    if len(arrays["y"]) == 0 or len(arrays["y_test"]) == 0:
        raise DataError(f"mnist1d: {num_samples} samples with train_fraction={train_fraction} leave a split empty")
    train_x, test_x = (torch.as_tensor(arrays[k]) for k in ("x", "x_test"))
    train_x, test_x = (x.flatten(1) if flatten else x.unsqueeze(1) for x in (train_x, test_x))
    device = torch.device("cpu") if device is None else torch.device(device)
    return DataSplit(
        train=TensorDataset(train_x.to(device), torch.as_tensor(arrays["y"]).to(device)),
        test=TensorDataset(test_x.to(device), torch.as_tensor(arrays["y_test"]).to(device)),
        num_classes=10,
        input_shape=tuple(train_x.shape[1:]),
        name="mnist1d",
    )


def _missing_files(name: str, data_root: str | os.PathLike | None) -> tuple[Path, list[str]]:
    """The folder torchvision reads ``name`` from and the files it lacks (it wants both splits' files)."""
    layout = _LAYOUTS[name]
    if data_root is None:
        raise DataError(
            f"data set {name!r} is read from a local folder, but data_root is None; pass the folder that "
            f"contains {layout.folder}/ (nothing is downloaded)"
        )
    folder = Path(data_root) / layout.folder
    wanted = dict.fromkeys(layout.train_files + layout.test_files)
    return folder, [f for f in wanted if not (folder / f).is_file()]


def _torchvision_class(name: str, verify: bool) -> type:
    """The torchvision data set class for ``name``; CIFAR checksums are skipped unless ``verify``.

    torchvision checks the MD5 of every CIFAR file of both splits on construction; without
    ``verify`` only the presence of the files is checked (which lets subsets and re-packed copies
    of the archives load).
    """
    from torchvision import datasets

    base = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "mnist": datasets.MNIST}[name]
    if verify or name == "mnist":
        return base
    unchecked = {
        "train_list": [[f, None] for f, _ in base.train_list],
        "test_list": [[f, None] for f, _ in base.test_list],
        "meta": {**base.meta, "md5": None},
    }
    return type(f"Local{base.__name__}", (base,), unchecked)


def load_dataset(
    name: str,
    data_root: str | os.PathLike | None,
    train: bool = True,
    transform: Callable | None = None,
    normalize: bool = True,
    verify: bool = False,
) -> Dataset:
    """One split of CIFAR-10, CIFAR-100 or MNIST read by torchvision from a local folder.

    Expected layout below ``data_root`` (as unpacked from the official archives):

    * ``cifar10``: ``cifar-10-batches-py/`` with ``data_batch_1`` ... ``data_batch_5``, ``test_batch``,
      ``batches.meta``;
    * ``cifar100``: ``cifar-100-python/`` with ``train``, ``test``, ``meta``;
    * ``mnist``: ``MNIST/raw/`` with the four unzipped idx files (``train-images-idx3-ubyte``, ...).

    Args:
        name: ``"cifar10"``, ``"cifar100"`` or ``"mnist"``.
        data_root: folder containing the data set folder above.
        train: the training split (else the test split).
        transform: transform applied to each PIL image; default: to a float tensor of shape
            ``(C, H, W)``, normalised with the data set's usual channel statistics if ``normalize``.
        normalize: see ``transform``.
        verify: also check the MD5 checksums of the official CIFAR files.

    Returns:
        A torchvision data set of ``(image, label)`` items.

    Raises:
        DataError: unknown name, ``data_root`` None, or the folder or one of its files missing or unreadable.
    """
    from torchvision import transforms

    key = str(name).lower()
    if key not in _LAYOUTS:
        raise DataError(f"unknown local data set {name!r}; expected one of {sorted(_LAYOUTS)}")
    folder, missing = _missing_files(key, data_root)
    layout = _LAYOUTS[key]
    if missing:
        where = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise DataError(
            f"{key}: folder {folder} {where}; expected {layout.folder}/ below data_root={data_root} with files "
            f"{', '.join(dict.fromkeys(layout.train_files + layout.test_files))} (nothing is downloaded)"
        )
    if transform is None:
        steps: list[Callable] = [transforms.ToTensor()]
        if normalize:
            steps.append(transforms.Normalize(layout.mean, layout.std))
        transform = transforms.Compose(steps)
    try:
        return _torchvision_class(key, verify)(root=str(data_root), train=train, transform=transform, download=False)
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{key}: could not read the files in {folder}: {exc}") from exc


def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``limit`` items (the whole data set if ``limit`` is None or larger)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise DataError(f"limit must be a positive number of samples, got {limit}")
    generator = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:limit].tolist())


def get_data(
    name: str = "digits",
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    limit: int | None = None,
    **kwargs: Any,
) -> DataSplit:
    """Dispatch to a data set by name: the entry point of experiments and the CLI.

    Args:
        name: one of :data:`DATASETS` (``"digits"``, ``"mnist1d"``, ``"cifar10"``, ``"cifar100"``, ``"mnist"``).
        data_root: folder of the local data sets (ignored for digits; for mnist1d the cache folder,
            default ``~/.cache/fusion/mnist1d``).
        seed: seed of the digits split and of the ``limit`` subsets (mnist1d is generated from its own
            ``seed`` keyword, default 42, so that runs with different seeds share the data set).
        limit: keep at most this many (seeded, random) samples of each split, for quick runs.
        **kwargs: passed to :func:`load_digits_data` (``image_size``, ``flatten``, ``test_fraction``,
            ``device``), :func:`load_mnist1d_data` (``num_samples``, ``train_fraction``, ``flatten``,
            ``device``; ``data_seed`` becomes its ``seed``) or :func:`load_dataset` (``transform``,
            ``normalize``, ``verify``).

    Returns:
        A :class:`DataSplit`.

    Raises:
        DataError: unknown name or missing files.
    """
    key = str(name).lower()
    if key == "digits":
        split = load_digits_data(seed=seed, **kwargs)
    elif key == "mnist1d":
        data_seed = kwargs.pop("data_seed", MNIST1D_SEED)
        split = load_mnist1d_data(seed=data_seed, cache_dir=data_root, **kwargs)
    elif key in _LAYOUTS:
        layout = _LAYOUTS[key]
        split = DataSplit(
            train=load_dataset(key, data_root, train=True, **kwargs),
            test=load_dataset(key, data_root, train=False, **kwargs),
            num_classes=layout.num_classes,
            input_shape=layout.input_shape,
            name=key,
        )
    else:
        raise DataError(f"unknown data set {name!r}; expected one of {list(DATASETS)}")
    if limit is None:
        return split
    return DataSplit(
        train=_subset(split.train, limit, seed),
        test=_subset(split.test, limit, seed + 1),
        num_classes=split.num_classes,
        input_shape=split.input_shape,
        name=split.name,
    )


def make_loaders(
    split: DataSplit, batch_size: int = 128, seed: int = 0, num_workers: int = 0
) -> tuple[DataLoader, DataLoader]:
    """DataLoaders for a split: the training one shuffled by a generator seeded with ``seed``.

    Args:
        split: the data.
        batch_size: samples per batch (the last batch may be smaller).
        seed: seed of the shuffling order (the same seed gives the same batches).
        num_workers: loader worker processes.

    Returns:
        ``(train_loader, test_loader)``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(split.train, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers)
    test = DataLoader(split.test, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train, test


def example_batch(split: DataSplit | Dataset, batch_size: int = 8) -> torch.Tensor:
    """The first ``batch_size`` training inputs stacked into one tensor (``example_inputs`` for tracing).

    Returns:
        A tensor of shape ``(batch_size, *input_shape)``.
    """
    dataset = split.train if isinstance(split, DataSplit) else split
    if len(dataset) == 0:
        raise DataError("cannot take an example batch from an empty data set")
    items: Sequence[Any] = [dataset[i][0] for i in range(min(batch_size, len(dataset)))]
    return torch.stack([torch.as_tensor(x) for x in items])
