"""`--precision`: the server runs the variant the manifest lists, says so (GetModelInfo, the
vae_model_info metric), keeps seeds exact within it, and refuses a version without it."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from service_harness import open_channel, running, scrape, tiny_settings

from export.model import VAE, VAEConfig
from export.onnx_export import export_version
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.client import ImageFormatName, images_from, sample_request


@pytest.fixture(scope="module")
def with_variants(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 784-32-4 VAE exported with its int8 and fp16 variants (both pass the gate)."""
    rng = np.random.default_rng(0)
    images = rng.random((1200, 784), dtype=np.float32)
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_size=4, hidden_sizes=(32,)))
    repo = tmp_path_factory.mktemp("variants")
    version = export_version(model, repo, "tiny-vae", variant_images=(images[:1000], images[1000:]))
    return version


def sample(
    stub: vae_pb2_grpc.VaeServiceStub, count: int, seed: int, fmt: ImageFormatName
) -> np.ndarray:
    reply = stub.Sample(sample_request(count, seed, None, fmt, False), timeout=30)
    images = images_from(reply.images)
    assert isinstance(images, np.ndarray)
    return images


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_a_variant_is_served_reported_and_exact_within_its_precision(
    with_variants: Path, precision: str
) -> None:
    settings = tiny_settings(with_variants, precision=precision)
    with running(settings) as served, open_channel(served.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        info = stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=10)
        assert info.precision == precision
        metrics = scrape(served.metrics_url)
        labels = [dict(k[1]) for k in metrics if k[0] == "vae_model_info"]
        assert [entry["precision"] for entry in labels] == [precision]
        # Batch-invariant: a seed's first rows are the same alone or in a larger request,
        # and the same under concurrency (the batcher mixes the calls into shared runs).
        ten = sample(stub, 10, 5, "uint8")
        assert np.array_equal(sample(stub, 3, 5, "uint8"), ten[:3])
        with ThreadPoolExecutor(8) as pool:
            alone = list(pool.map(lambda s: sample(stub, 1, s, "uint8"), range(16)))
        assert all(np.array_equal(a, sample(stub, 1, s, "uint8")) for s, a in enumerate(alone))
        variant = sample(stub, 64, 1, "probabilities")
    with running(tiny_settings(with_variants)) as served, open_channel(served.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        assert stub.GetModelInfo(vae_pb2.GetModelInfoRequest()).precision == "fp32"
        fp32 = sample(stub, 64, 1, "probabilities")
    # Another graph ran (not bit-identical), close to the fp32 one (the gate's bound).
    assert not np.array_equal(variant, fp32)
    assert float(np.mean(np.abs(variant - fp32))) < 0.005


def test_a_version_without_the_variant_refuses_to_start_in_one_line(tiny_model: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            f"--model-repo={tiny_model.parent.parent}",
            f"--model-name={tiny_model.parent.name}",
            "--precision=int8",
            "--provider=cpu",
            "--port=0",
            "--metrics-port=-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert "cannot start" in line and "has no int8 variant (it has fp32)" in line
    assert "Traceback" not in result.stderr
