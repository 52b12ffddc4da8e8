"""Precision variants: written only through the quality gate, listed in the manifest with their
checksums and figures, verified like the fp32 files; a batch-dependent int8 graph is refused."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from export.checkpoint import model_from_checkpoint
from export.manifest import ModelError, load_verified, open_version
from export.onnx_export import export_version, flat_images
from export.precision import (
    MAX_ELBO_COST,
    MAX_IW_COST,
    MAX_TEMPERATURE_ERROR,
    VariantRefused,
    quality_gate,
)
from vae_data.mnist import Dataset


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
    trained: tuple[Path, dict[str, Any]],
    small_dataset: Dataset,
) -> Path:
    images = (flat_images(small_dataset.train.images), flat_images(small_dataset.test.images))
    repo = tmp_path_factory.mktemp("repo")
    return export_version(model_from_checkpoint(trained[1]), repo, "tiny", variant_images=images)


def test_variants_pass_their_gate_and_are_verified_like_fp32(exported: Path) -> None:
    manifest = load_verified(exported)
    assert manifest.precisions()[0] == "fp32" and "fp16" in manifest.variants
    for precision, variant in manifest.variants.items():
        assert variant.encoder.path == f"encoder.{precision}.onnx"
        assert variant.decoder.path == f"decoder.{precision}.onnx"
        assert variant.quality["negative_elbo_cost"] <= MAX_ELBO_COST
        assert variant.quality["iw_nll_cost"] <= MAX_IW_COST
        assert variant.quality["temperature_2_probability_error"] <= MAX_TEMPERATURE_ERROR
        assert set(open_version(exported, precision).networks) == {"encoder", "decoder"}
    if "int8" in manifest.variants:
        recipe = manifest.variants["int8"].recipe
        assert recipe["calibration"]["seed"] == 0 and recipe["onnxruntime"]
        assert recipe["kept_float"]["decoder"]


def test_a_tampered_variant_fails_verification(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(exported, copy)
    with (copy / "decoder.fp16.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match=r"decoder\.fp16\.onnx: sha256 .* does not match"):
        load_verified(copy)
    open_version(copy)  # the fp32 networks alone are still intact


def test_a_precision_the_version_lacks_is_one_line(exported: Path) -> None:
    with pytest.raises(ModelError, match=r"has no bf16 variant \(it has fp32, fp16") as error:
        open_version(exported, "bf16")
    assert "\n" not in str(error.value)


def test_dynamic_quantization_is_refused_as_batch_dependent(
    exported: Path, tmp_path: Path, small_dataset: Dataset
) -> None:
    """quantize_dynamic takes activation scales from the whole batch: a row's output depends
    on its batch mates, so a seed would not reproduce. The gate must see it."""
    version = tmp_path / "v"
    shutil.copytree(exported, version)
    for network in ("encoder", "decoder"):
        quantize_dynamic(
            str(version / f"{network}.onnx"),
            str(version / f"{network}.int8.onnx"),
            weight_type=QuantType.QInt8,
        )
    with pytest.raises(VariantRefused, match="int8: the decoder is not batch-invariant"):
        quality_gate(version, "int8", flat_images(small_dataset.test.images))
