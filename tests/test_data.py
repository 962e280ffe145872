"""Specification of fusion.data: the embedded digits split, procedural MNIST-1D, loaders and the local CIFAR/MNIST readers."""

from __future__ import annotations

import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import fusion.data
from fusion.data import (
    DATASETS,
    DataSplit,
    example_batch,
    get_data,
    load_dataset,
    load_digits_data,
    load_mnist1d_data,
    make_loaders,
)
from fusion.errors import DataError


def test_digits_split_sizes_and_shapes() -> None:
    split = load_digits_data(seed=0)
    assert isinstance(split, DataSplit)
    assert (len(split.train), len(split.test)) == (1347, 450)
    x, y = split.train.tensors
    assert x.shape == (1347, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert split.input_shape == (1, 8, 8) and split.num_classes == 10 and split.name == "digits"


def test_digits_train_inputs_are_standardised() -> None:
    x = load_digits_data(seed=0).train.tensors[0]
    assert abs(float(x.mean())) < 1e-5
    assert abs(float(x.std()) - 1.0) < 1e-5


def test_digits_test_split_uses_train_statistics() -> None:
    x = load_digits_data(seed=0).test.tensors[0]
    assert abs(float(x.mean())) > 1e-4  # not re-standardised on its own statistics
    assert abs(float(x.mean())) < 0.2


def test_digits_split_is_stratified() -> None:
    y = load_digits_data(seed=0).test.tensors[1]
    counts = torch.bincount(y, minlength=10)
    assert int(counts.min()) >= 43 and int(counts.max()) <= 47


def test_digits_same_seed_same_split_other_seed_other_split() -> None:
    a, b, c = load_digits_data(seed=0), load_digits_data(seed=0), load_digits_data(seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_digits_image_size_upsamples() -> None:
    split = load_digits_data(image_size=16)
    assert split.train.tensors[0].shape[1:] == (1, 16, 16)
    assert split.input_shape == (1, 16, 16)


def test_digits_flatten_gives_vectors() -> None:
    assert load_digits_data(flatten=True).train.tensors[0].shape[1:] == (64,)
    split = load_digits_data(flatten=True, image_size=12)
    assert split.train.tensors[0].shape[1:] == (144,) and split.input_shape == (144,)


@pytest.mark.parametrize("kwargs", [{"test_fraction": 0.0}, {"test_fraction": 1.5}, {"image_size": 0}])
def test_digits_bad_arguments_raise_data_error(kwargs: dict) -> None:
    with pytest.raises(DataError):
        load_digits_data(**kwargs)


def test_make_loaders_shuffle_is_seeded() -> None:
    split = load_digits_data()
    first = [next(iter(make_loaders(split, 32, seed=s)[0]))[1] for s in (0, 0, 1)]
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first[0], first[2])


def test_make_loaders_test_loader_keeps_order() -> None:
    split = load_digits_data()
    _, test = make_loaders(split, batch_size=100)
    assert torch.equal(torch.cat([y for _, y in test]), split.test.tensors[1])
    assert len(test) == 5


def test_make_loaders_rejects_bad_batch_size() -> None:
    with pytest.raises(DataError, match="batch_size"):
        make_loaders(load_digits_data(), batch_size=0)


# --- local data sets written in their real on-disk formats -------------------------------------------


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _write_pickle(folder / f"data_batch_{i}", {"data": _cifar_images(2, i), "labels": [i % 10, (i + 1) % 10]})
    _write_pickle(folder / "test_batch", {"data": _cifar_images(3, 9), "labels": [7, 8, 9]})
    _write_pickle(folder / "batches.meta", {"label_names": [f"class{k}" for k in range(10)]})
    return tmp_path


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0801 if array.ndim == 1 else 0x0803
    with open(path, "wb") as f:
        f.write(struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape) + array.tobytes())


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8))
    return tmp_path


def test_load_cifar10_from_local_pickle_batches(cifar10_root: Path) -> None:
    train = load_dataset("cifar10", cifar10_root, train=True)
    test = load_dataset("cifar10", cifar10_root, train=False, normalize=False)
    assert (len(train), len(test)) == (10, 3)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    raw = _cifar_images(3, 9)[0].reshape(3, 32, 32) / 255.0
    assert torch.allclose(test[0][0], torch.as_tensor(raw, dtype=torch.float32))
    assert test[2][1] == 9


def test_load_cifar100_from_local_pickle_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write_pickle(folder / "train", {"data": _cifar_images(4, 0), "fine_labels": [0, 50, 99, 3]})
    _write_pickle(folder / "test", {"data": _cifar_images(2, 1), "fine_labels": [98, 1]})
    _write_pickle(folder / "meta", {"fine_label_names": [f"c{k}" for k in range(100)]})
    split = get_data("cifar100", tmp_path)
    assert (len(split.train), len(split.test), split.num_classes) == (4, 2, 100)
    assert split.train[2][1] == 99 and split.input_shape == (3, 32, 32)


def test_load_mnist_from_local_idx_files(mnist_root: Path) -> None:
    train = load_dataset("mnist", mnist_root, train=True)
    test = load_dataset("mnist", mnist_root, train=False)
    assert (len(train), len(test)) == (5, 3)
    image, label = test[2]
    assert image.shape == (1, 28, 28) and label == 2


def test_absent_folder_raises_data_error_naming_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py") as info:
        load_dataset("cifar10", tmp_path / "nowhere")
    assert "nowhere" in str(info.value) and "data_batch_1" in str(info.value)


def test_missing_file_is_named(cifar10_root: Path) -> None:
    (cifar10_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", cifar10_root, train=False)


def test_absent_mnist_folder_names_raw_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        get_data("mnist", tmp_path)


def test_corrupt_file_raises_data_error(cifar10_root: Path) -> None:
    (cifar10_root / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="could not read"):
        load_dataset("cifar10", cifar10_root, train=False)


def test_local_data_set_needs_data_root() -> None:
    with pytest.raises(DataError, match="data_root"):
        load_dataset("cifar10", None)


def test_get_data_defaults_to_digits() -> None:
    split = get_data()
    assert split.name == "digits" and len(split.train) == 1347
    assert "digits" in DATASETS and "cifar10" in DATASETS


def test_get_data_passes_digit_options() -> None:
    assert get_data("digits", flatten=True).input_shape == (64,)


def test_get_data_unknown_name_raises() -> None:
    with pytest.raises(DataError, match="imagenet"):
        get_data("imagenet")


def test_get_data_limit_takes_seeded_subsets(cifar10_root: Path) -> None:
    split = get_data("cifar10", cifar10_root, limit=4)
    assert (len(split.train), len(split.test)) == (4, 3)
    assert len(get_data("digits", limit=100).train) == 100


def test_example_batch_stacks_first_inputs() -> None:
    split = load_digits_data()
    batch = example_batch(split, 5)
    assert batch.shape == (5, 1, 8, 8)
    assert torch.equal(batch, split.train.tensors[0][:5])


# --- MNIST-1D (generated by the mnist1d package; small sizes keep the tests fast) ---


def test_mnist1d_split_sizes_shapes_and_labels(tmp_path: Path) -> None:
    split = load_mnist1d_data(num_samples=200, cache_dir=tmp_path)
    assert (len(split.train), len(split.test)) == (160, 40)
    x, y = split.train.tensors
    assert x.shape == (160, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) == 10
    assert split.input_shape == (1, 40) and split.num_classes == 10 and split.name == "mnist1d"


def test_mnist1d_default_is_the_standard_4000_1000_split(tmp_path: Path) -> None:
    split = load_mnist1d_data(cache_dir=tmp_path)
    assert (len(split.train), len(split.test)) == (4000, 1000)
    x = torch.cat([split.train.tensors[0], split.test.tensors[0]])
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3  # the package's standardisation


def test_mnist1d_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    a = load_mnist1d_data(num_samples=100, seed=1, cache_dir=tmp_path / "a")
    b = load_mnist1d_data(num_samples=100, seed=1, cache_dir=tmp_path / "b")
    c = load_mnist1d_data(num_samples=100, seed=2, cache_dir=tmp_path / "a")
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_mnist1d_is_cached_and_read_back_without_generating(tmp_path: Path, monkeypatch) -> None:
    first = load_mnist1d_data(num_samples=100, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.npz")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(fusion.data, "_generate_mnist1d", no_generation)
    again = load_mnist1d_data(num_samples=100, cache_dir=tmp_path)
    assert torch.equal(first.train.tensors[0], again.train.tensors[0])
    assert cached.is_file()


def test_mnist1d_leaves_the_global_random_generators_alone(tmp_path: Path) -> None:
    np.random.seed(7)
    random.seed(7)
    expected = (np.random.rand(), random.random())
    np.random.seed(7)
    random.seed(7)
    load_mnist1d_data(num_samples=50, cache_dir=tmp_path)
    assert (np.random.rand(), random.random()) == expected


def test_mnist1d_flatten_gives_vectors(tmp_path: Path) -> None:
    split = load_mnist1d_data(num_samples=50, flatten=True, cache_dir=tmp_path)
    assert split.train.tensors[0].shape[1:] == (40,) and split.input_shape == (40,)


@pytest.mark.parametrize(("kwargs", "match"), [({"num_samples": 10}, "num_samples"),
                                               ({"num_samples": 100.0}, "num_samples"),
                                               ({"train_fraction": 1.0}, "train_fraction")])
def test_mnist1d_bad_arguments_raise(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_mnist1d_data(cache_dir=tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


def test_get_data_reads_mnist1d_with_data_root_as_cache(tmp_path: Path) -> None:
    split = get_data("mnist1d", tmp_path, num_samples=100, data_seed=3)
    assert "mnist1d" in DATASETS and split.name == "mnist1d" and len(split.train) == 80
    assert torch.equal(split.train.tensors[0], load_mnist1d_data(100, seed=3, cache_dir=tmp_path).train.tensors[0])
    assert len(get_data("mnist1d", tmp_path, num_samples=100, limit=10).train) == 10
