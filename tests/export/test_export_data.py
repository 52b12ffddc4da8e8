"""The IDX reader on small files written here, the embedded default, and binarization."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vae_data.mnist import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    DataError,
    binarize,
    binarized_test_set,
    load_dataset,
    read_idx,
)


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file: 2 zero bytes, 0x08 (ubyte), the dimension count, big-endian sizes, data."""
    if magic is None:
        magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, compress: bool) -> Path:
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_mnist_dir(
    directory: Path, n_train: int = 12, n_test: int = 5, side: int = 28, compress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, side, side), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, side, side), dtype=np.uint8)
    write(directory / "train-images-idx3-ubyte", idx_bytes(train), compress)
    write(directory / "train-labels-idx1-ubyte", idx_bytes(np.arange(n_train) % 10), compress)
    write(directory / "t10k-images-idx3-ubyte", idx_bytes(test), compress)
    write(directory / "t10k-labels-idx1-ubyte", idx_bytes(np.arange(n_test) % 10), compress)
    return train, test


@pytest.mark.parametrize("compress", [True, False])
def test_reads_gzip_and_raw_idx(tmp_path: Path, compress: bool) -> None:
    train, test = make_mnist_dir(tmp_path, compress=compress)
    dataset = load_dataset(tmp_path, verbose=False)
    # the last sixth (at most 10,000) of the training file is the validation split
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (10, 2, 5)
    assert dataset.train.images.dtype == np.uint8 and dataset.train.images.shape == (10, 784)
    np.testing.assert_array_equal(dataset.train.images, train[:10].reshape(10, 784))
    np.testing.assert_array_equal(dataset.validation.images, train[10:].reshape(2, 784))
    np.testing.assert_array_equal(dataset.test.images, test.reshape(5, 784))
    np.testing.assert_array_equal(dataset.test.labels, np.arange(5))


def test_bad_magic_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "x-idx3-ubyte", idx_bytes(np.zeros((2, 28, 28)), 0x00000804), False)
    with pytest.raises(DataError, match=r"x-idx3-ubyte: bad magic number 0x00000804"):
        read_idx(path, IMAGES_MAGIC)
    # labels where images are expected
    labels = write(tmp_path / "labels", idx_bytes(np.zeros(3)), True)
    with pytest.raises(DataError, match=r"labels\.gz: bad magic number 0x00000801"):
        read_idx(labels, IMAGES_MAGIC)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((3, 28, 28)))
    path = write(tmp_path / "images", data[:-100], True)
    with pytest.raises(DataError, match=r"images.gz: truncated: header says shape \[3, 28, 28\]"):
        read_idx(path, IMAGES_MAGIC)
    header_only = write(tmp_path / "short", data[:9], False)
    with pytest.raises(DataError, match="short: truncated header"):
        read_idx(header_only, IMAGES_MAGIC)
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(write(tmp_path / "long", data + b"\0", False), IMAGES_MAGIC)
    broken_gzip = tmp_path / "broken.gz"
    broken_gzip.write_bytes(gzip.compress(data)[:-20])
    with pytest.raises(DataError, match=r"broken\.gz: corrupt gzip"):
        read_idx(broken_gzip, IMAGES_MAGIC)


def test_wrong_sizes_are_refused(tmp_path: Path) -> None:
    make_mnist_dir(tmp_path, side=20)
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte\.gz: images are 20x20, expected 28x28"
    ):
        load_dataset(tmp_path, verbose=False)
    make_mnist_dir(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.arange(4)), True)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: 4 labels for the 5 images"):
        load_dataset(tmp_path, verbose=False)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", IMAGES_MAGIC)
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", LABELS_MAGIC).shape == (4,)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(tmp_path / "nowhere", verbose=False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[.gz\]: not found"):
        load_dataset(tmp_path, verbose=False)


def test_embedded_default(capsys: pytest.CaptureFixture[str]) -> None:
    dataset = load_dataset()
    assert "embedded MNIST subset" in capsys.readouterr().out
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (4000, 500, 500)
    for split in (dataset.train, dataset.validation, dataset.test):
        assert split.images.dtype == np.uint8 and split.images.shape[1] == 784
        assert set(split.labels.tolist()) == set(range(10))  # the file is sorted; splits are not
    # the split is fixed, whatever the training seed
    np.testing.assert_array_equal(load_dataset(verbose=False).test.images, dataset.test.images)


def test_binarization_is_fixed_by_its_seed() -> None:
    dataset = load_dataset(verbose=False)
    a, b = binarized_test_set(dataset), binarized_test_set(dataset)
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a).tolist()) == {0.0, 1.0} and a.dtype == np.float32
    assert abs(a.mean() - dataset.test.images.mean() / 255) < 0.005
    assert not np.array_equal(a, binarize(dataset.test.images, seed=1))
    assert binarize(np.array([[0, 255]], np.uint8), 0).tolist() == [[0.0, 1.0]]


def test_data_module_does_not_import_torch() -> None:
    code = "import sys, vae_data.mnist; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
