"""The trained default model (`make model`) for tests that need a real one, and its test digits;
tests skip when it is absent (`make test` trains it first, so CI has it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest
from service_harness import Served, running, tiny_settings

from export.manifest import ModelError, resolve_version
from vae_data.mnist import DataError, Dataset, load_dataset

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "mnist-vae"


def default_version() -> Path:
    """`models/mnist-vae/<latest>/`, or skip the test."""
    try:
        return resolve_version(MODEL_DIR.parent, MODEL_DIR.name)
    except ModelError:
        pytest.skip(f"no trained default model in {MODEL_DIR} (`make model` trains one)")


@cache
def default_dataset(version: Path) -> Dataset:
    """The data the model was trained on (its test split is held out), or skip. Read once."""
    data = json.loads((version / "manifest.json").read_text())["training"].get("data", {})
    data_dir = data.get("data_dir")
    if data_dir is not None and not Path(data_dir).is_dir():
        pytest.skip(f"the model was trained on {data_dir}, which is not here for its test set")
    try:
        return load_dataset(Path(data_dir) if data_dir else None, verbose=False)
    except DataError as e:
        pytest.skip(f"the default model's data is not available: {e}")


@contextmanager
def serving_default(version: Path) -> Iterator[Served]:
    """The default model served in process on free ports (metrics off)."""
    settings = tiny_settings(version, model_name=MODEL_DIR.name, metrics_port=-1)
    with running(settings) as served:
        yield served
