"""Export: ONNX parity with PyTorch, the manifest's checksums, and tamper detection."""

from __future__ import annotations

import copy
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.checkpoint import model_from_checkpoint
from export.manifest import ModelError, load_verified, resolve_version, sha256_of
from export.model import VAE
from export.onnx_export import PARITY_BATCH_SIZES, PARITY_TOLERANCE, export_version
from service.sampling import sigmoid_, to_uint8
from vae_data.mnist import Dataset


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
        parity_images_source="the test images",
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
    assert manifest.image_shape == [28, 28]
    signatures = {
        role: [(t.name, t.dtype, t.shape) for t in net.inputs + net.outputs]
        for role, net in manifest.networks().items()
    }
    assert signatures == {
        "encoder": [
            ("image", "float32", ["N", 784]),
            ("mean", "float32", ["N", 4]),
            ("log_variance", "float32", ["N", 4]),
        ],
        "decoder": [
            ("latent", "float32", ["N", 4]),
            ("logits", "float32", ["N", 784]),
            ("image", "uint8", ["N", 784]),
        ],
    }
    assert manifest.parity_check["batch_sizes"] == [1, 257] == list(PARITY_BATCH_SIZES)
    assert manifest.parity_check["tolerance"] == PARITY_TOLERANCE == 1e-4
    assert manifest.parity_check["encoder_inputs"] == "the test images"
    created = datetime.fromisoformat(manifest.created_at)
    assert abs(datetime.now(UTC) - created) < timedelta(hours=1)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    assert manifest.git_commit == (head.stdout.strip() if head.returncode == 0 else "unknown")


def test_the_onnx_graphs_have_the_manifests_signature(exported: Path) -> None:
    """What ONNX Runtime itself reports, not only what the manifest claims."""
    manifest = load_verified(exported)
    for role, net in manifest.networks().items():
        session = ort.InferenceSession(exported / net.path, providers=["CPUExecutionProvider"])
        for declared, actual in (
            (net.inputs, session.get_inputs()),
            (net.outputs, session.get_outputs()),
        ):
            assert [t.name for t in declared] == [a.name for a in actual], role
            types = {"float32": "tensor(float)", "uint8": "tensor(uint8)"}
            assert [a.type for a in actual] == [types[t.dtype] for t in declared], role
            # The batch axis is symbolic (dynamic); the width is fixed.
            assert [[d if isinstance(d, int) else "N" for d in a.shape] for a in actual] == [
                t.shape for t in declared
            ], role


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


def test_the_decoders_image_output_rounds_its_own_logits(exported: Path) -> None:
    """The uint8 image output is round(255 * sigmoid(logits)) of the same run, as the service's
    numpy would round it, but for a level here and there where the two sigmoids differ in the
    last float bit; and it does not change the logits the parity check saw."""
    latent = np.random.default_rng(3).standard_normal((4096, 4)).astype(np.float32)
    decoder = ort.InferenceSession(exported / "decoder.onnx", providers=["CPUExecutionProvider"])
    logits, image = decoder.run(["logits", "image"], {"latent": latent})
    (alone,) = decoder.run(["logits"], {"latent": latent})
    np.testing.assert_array_equal(logits, alone)
    rounded = to_uint8(sigmoid_(logits.copy()))
    assert image.dtype == np.uint8 and image.shape == (4096, 784)
    difference = np.abs(image.astype(np.int16) - rounded)
    assert difference.max() <= 1 and np.count_nonzero(difference) <= image.size // 10_000


def test_next_export_is_the_next_version(exported: Path, model: VAE) -> None:
    second = export_version(model, exported.parent.parent, "tiny")
    assert second.name == "2" and load_verified(second).version == 2
    with pytest.raises(ModelError, match="already exists"):
        export_version(model, exported.parent.parent, "tiny", version=2)


def test_export_refuses_a_model_onnx_runtime_does_not_reproduce(tmp_path: Path, model: VAE) -> None:
    """Weights a million times too large make logits of ~1e8, where float32 rounding in the
    two runtimes' different summation orders alone differs by far more than 1e-4: the export
    must refuse, and leave no version behind."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in broken.decoder.parameters():
            parameter.mul_(1e3)
    with pytest.raises(
        ModelError, match=r"decoder: PyTorch and ONNX Runtime differ by .* > 0\.0001"
    ):
        export_version(broken, tmp_path, "tiny")
    assert list((tmp_path / "tiny").iterdir()) == []


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
