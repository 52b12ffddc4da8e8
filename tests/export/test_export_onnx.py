"""Export: ONNX parity with PyTorch, the manifest's checksums, and tamper detection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.data import Dataset
from export.manifest import ModelError, load_verified, resolve_version, sha256_of
from export.model import VAE
from export.onnx_export import PARITY_TOLERANCE, export_version
from export.train import model_from_checkpoint


@pytest.fixture(scope="module")
def model(trained: tuple[Path, dict[str, Any]]) -> VAE:
    return model_from_checkpoint(trained[1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, model: VAE, small_dataset: Dataset) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    images = torch.from_numpy(small_dataset.test.images).float() / 255
    return export_version(
        model,
        repo,
        "tiny",
        parity_images=images,
        training={"epochs": 6},
        metrics={"negative_elbo": 150.0, "iw_nll": 145.0, "iw_k": 10.0},
    )


def test_export_writes_a_verified_version(exported: Path, model: VAE) -> None:
    assert exported.name == "1" and resolve_version(exported.parent.parent, "tiny") == exported
    manifest = load_verified(exported)
    assert manifest.name == "tiny" and manifest.latent_size == 4 and manifest.opset == 17
    assert manifest.encoder.sha256 == sha256_of(exported / "encoder.onnx")
    assert manifest.decoder.sha256 == sha256_of(exported / "decoder.onnx")
    assert set(manifest.parity) == {"encoder", "decoder"}
    assert all(0 <= err <= PARITY_TOLERANCE for err in manifest.parity.values())
    assert manifest.metrics["iw_k"] == 10.0 and manifest.training == {"epochs": 6}
    assert manifest.config == model.config.to_dict()
    assert [t.name for t in manifest.encoder.outputs] == ["mean", "log_variance"]


@pytest.mark.parametrize("batch", [1, 3, 300])
def test_onnx_matches_pytorch_at_any_batch(exported: Path, model: VAE, batch: int) -> None:
    rng = np.random.default_rng(batch)
    image = rng.random((batch, 784), dtype=np.float32)
    latent = rng.standard_normal((batch, 4)).astype(np.float32)
    encoder = ort.InferenceSession(exported / "encoder.onnx", providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(exported / "decoder.onnx", providers=["CPUExecutionProvider"])
    mean, log_variance = encoder.run(["mean", "log_variance"], {"image": image})
    (logits,) = decoder.run(["logits"], {"latent": latent})
    with torch.no_grad():
        expected_mean, expected_log_variance = model.encoder(torch.from_numpy(image))
        expected_logits = model.decoder(torch.from_numpy(latent))
    np.testing.assert_allclose(mean, expected_mean.numpy(), atol=1e-4)
    np.testing.assert_allclose(log_variance, expected_log_variance.numpy(), atol=1e-4)
    np.testing.assert_allclose(logits, expected_logits.numpy(), atol=1e-4)


def test_next_export_is_the_next_version(exported: Path, model: VAE) -> None:
    second = export_version(model, exported.parent.parent, "tiny")
    assert second.name == "2" and load_verified(second).version == 2
    with pytest.raises(ModelError, match="already exists"):
        export_version(model, exported.parent.parent, "tiny", version=2)


def test_a_tampered_onnx_file_fails_the_manifest_check(tmp_path: Path, model: VAE) -> None:
    version = export_version(model, tmp_path, "tiny")
    decoder = version / "decoder.onnx"
    data = bytearray(decoder.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    decoder.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"decoder\.onnx: sha256 .* does not match"):
        load_verified(version)
    decoder.unlink()
    with pytest.raises(ModelError, match="missing"):
        load_verified(version)
