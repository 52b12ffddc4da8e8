"""Fixtures for the batcher: the tiny exported decoder on ONNX Runtime, and an executor."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest


@pytest.fixture(scope="session")
def decoder_session(tiny_model: Path) -> ort.InferenceSession:
    """The decoder of `tiny_model` (tests/conftest.py: latent size 4), one ORT thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        str(tiny_model / "decoder.onnx"), options, providers=["CPUExecutionProvider"]
    )


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2, thread_name_prefix="test-inference") as pool:
        yield pool


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
