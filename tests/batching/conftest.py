"""Fixtures for the batcher: a tiny real decoder on ONNX Runtime, and an executor."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.model import VAE, VAEConfig
from export.onnx_export import export_version

LATENT = 4


@pytest.fixture(scope="session")
def decoder_session(tmp_path_factory: pytest.TempPathFactory) -> ort.InferenceSession:
    torch.manual_seed(0)
    version = export_version(
        VAE(VAEConfig(latent_size=LATENT, hidden_sizes=(32,))),
        tmp_path_factory.mktemp("repo"),
        "tiny",
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        str(version / "decoder.onnx"), options, providers=["CPUExecutionProvider"]
    )


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2, thread_name_prefix="test-inference") as pool:
        yield pool


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
