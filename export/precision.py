"""Precision variants of an exported version: int8 (static QDQ) for CPUs, fp16 for CUDA.

The fp32 files stay the parity-checked reference. Each variant is written beside them
(`encoder.int8.onnx`, `decoder.int8.onnx`, ...) only if it passes a quality gate against fp32,
paired on the same images and the same random draws:

- batch-invariant: rows run alone are bit-identical to the same rows in a batch of 1024 (what
  makes a seed reproduce whatever a request was batched with; `quantize_dynamic` fails this,
  since it takes activation scales from the whole batch, so it is never used);
- at most `MAX_ELBO_COST` nats more negative ELBO, and at most `MAX_IW_COST` more
  importance-weighted -log p(x), on held-out images;
- at most `MAX_TEMPERATURE_ERROR` mean absolute error in the decoder's pixel probabilities for
  latents drawn at temperature 2, beyond the range int8 scales were calibrated on.

int8 recipe (measured on the served 32-512-256 GELU decoder; see README "Precision"): only the
Gemms are quantized, their outputs left float, weights per channel in the decoder and per
tensor in the encoder, the decoder's first Gemm (latent -> hidden) kept float; activation
scales calibrated on prior draws and posterior samples of training images. fp16 converts every
weight and activation, with float32 inputs and outputs so clients see no difference.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16

PRECISIONS = ("int8", "fp16")
MAX_ELBO_COST = 0.25  # nats of negative ELBO a variant may add
MAX_IW_COST = 0.1  # nats of importance-weighted -log p(x)
MAX_TEMPERATURE_ERROR = 0.005  # mean |p_variant - p_fp32| at temperature 2
INVARIANCE_BATCH = 1024
INVARIANCE_ROWS = 32  # rows checked one at a time against the batch of 1024
GATE_IMAGES = 500  # held-out images for the paired quality figures
GATE_IW_SAMPLES = 64
CALIBRATION_IMAGES = 1000
CALIBRATION_SEED = 0


class VariantRefused(Exception):
    """A variant that fails its quality gate: one line saying which check and by how much."""


@dataclass(frozen=True)
class Networks:
    """An encoder and a decoder on the CPU, one thread (the gate's figures are per network)."""

    encoder: ort.InferenceSession
    decoder: ort.InferenceSession

    @classmethod
    def load(cls, encoder: Path, decoder: Path) -> Networks:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        cpu = ["CPUExecutionProvider"]
        return cls(
            ort.InferenceSession(str(encoder), options, providers=cpu),
            ort.InferenceSession(str(decoder), options, providers=cpu),
        )

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, log_variance = self.encoder.run(["mean", "log_variance"], {"image": images})
        return mean, log_variance

    def logits(self, latents: np.ndarray) -> np.ndarray:
        (logits,) = self.decoder.run(["logits"], {"latent": latents})  # not the uint8 image
        return np.asarray(logits)


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, data: np.ndarray, batches: int = 20) -> None:
        self.batches: Iterator[np.ndarray] = iter(np.array_split(data, batches))
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


@contextlib.contextmanager
def _quiet_root_warnings() -> Iterator[None]:
    """onnxruntime.quantization logs its "consider pre-processing" advice on the root logger at
    every call; the graphs here are already exported optimised."""

    def advice(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _first_gemm(path: Path) -> str:
    return next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Gemm")


def _quantize_pair(
    directory: Path, images: np.ndarray, latents: np.ndarray, kept_float: list[str]
) -> None:
    common: dict[str, Any] = {
        "quant_format": QuantFormat.QDQ,
        "op_types_to_quantize": ["Gemm"],
        "activation_type": QuantType.QInt8,
        "weight_type": QuantType.QInt8,
        "extra_options": {"OpTypesToExcludeOutputQuantization": ["Gemm"]},
    }
    quantize_static(
        str(directory / "encoder.onnx"),
        str(directory / "encoder.int8.onnx"),
        _Batches("image", images),
        per_channel=False,
        **common,
    )
    quantize_static(
        str(directory / "decoder.onnx"),
        str(directory / "decoder.int8.onnx"),
        _Batches("latent", latents),
        per_channel=True,
        nodes_to_exclude=kept_float,
        **common,
    )


def write_int8(directory: Path, train_images: np.ndarray) -> dict[str, Any]:
    """encoder.int8.onnx and decoder.int8.onnx beside the fp32 files; returns the recipe."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    images = train_images[:CALIBRATION_IMAGES]
    fp32 = Networks.load(directory / "encoder.onnx", directory / "decoder.onnx")
    mean, log_variance = fp32.encode(images)
    posterior = mean + np.exp(log_variance / 2) * rng.standard_normal(mean.shape)
    prior = rng.standard_normal(mean.shape)
    latents = np.concatenate([prior, posterior]).astype(np.float32)
    kept_float = [_first_gemm(directory / "decoder.onnx")]
    with _quiet_root_warnings():
        _quantize_pair(directory, images, latents, kept_float)
    return {
        "method": "onnxruntime.quantization.quantize_static, QDQ, QInt8 weights and activations",
        "onnxruntime": ort.__version__,
        "quantized_ops": ["Gemm"],
        "gemm_outputs": "float",
        "per_channel": {"encoder": False, "decoder": True},
        "kept_float": {"decoder": kept_float},
        "calibration": {
            "encoder": f"the first {len(images)} training images",
            "decoder": f"{len(images)} prior draws N(0, I) and one posterior sample of each of "
            "those images",
            "seed": CALIBRATION_SEED,
            "method": "MinMax",
        },
    }


def write_fp16(directory: Path) -> dict[str, Any]:
    """encoder.fp16.onnx and decoder.fp16.onnx (float32 inputs and outputs kept)."""
    for network in ("encoder", "decoder"):
        model = convert_float_to_float16(
            onnx.load(str(directory / f"{network}.onnx")), keep_io_types=True
        )
        onnx.save(model, str(directory / f"{network}.fp16.onnx"))
    return {
        "method": "onnxruntime.transformers.float16.convert_float_to_float16, keep_io_types",
        "onnxruntime": ort.__version__,
        "for": "the CUDA execution provider; quality checked on the CPU",
    }


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def paired_scores(
    networks: Networks, images: np.ndarray, samples: int, seed: int
) -> tuple[float, float]:
    """Mean negative ELBO and importance-weighted -log p(x) (`samples` draws) in nats, over
    `images` binarized with `seed`; the same seed gives the same binarization and draws."""
    rng = np.random.default_rng(seed)
    x = (rng.random(images.shape) < images).astype(np.float32)
    mean, log_variance = networks.encode(x)
    kl = 0.5 * np.sum(np.exp(log_variance) + mean**2 - 1 - log_variance, axis=1)
    log_weights, first_reconstruction = [], None
    for _ in range(samples):
        eps = rng.standard_normal(mean.shape)
        z = (mean + np.exp(log_variance / 2) * eps).astype(np.float32)
        logits = networks.logits(z)
        reconstruction = np.sum(x * _softplus(-logits) + (1 - x) * _softplus(logits), axis=1)
        if first_reconstruction is None:
            first_reconstruction = reconstruction
        log_q = -0.5 * np.sum(eps**2 + log_variance + np.log(2 * np.pi), axis=1)
        log_p = -0.5 * np.sum(z.astype(np.float64) ** 2 + np.log(2 * np.pi), axis=1)
        log_weights.append(-reconstruction + log_p - log_q)
    assert first_reconstruction is not None
    iw = -(np.logaddexp.reduce(np.array(log_weights), axis=0) - np.log(samples))
    return float(np.mean(first_reconstruction + kl)), float(np.mean(iw))


def _batch_invariant(run: Any, rows: np.ndarray) -> bool:
    batch = np.asarray(run(rows[:INVARIANCE_BATCH]))
    alone = [np.asarray(run(rows[i : i + 1])) for i in range(INVARIANCE_ROWS)]
    return bool(np.array_equal(batch[:INVARIANCE_ROWS], np.concatenate(alone)))


def quality_gate(
    directory: Path, precision: str, test_images: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """The variant's figures against fp32 (raises VariantRefused past any limit)."""
    fp32 = Networks.load(directory / "encoder.onnx", directory / "decoder.onnx")
    variant = Networks.load(
        directory / f"encoder.{precision}.onnx", directory / f"decoder.{precision}.onnx"
    )
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((INVARIANCE_BATCH, fp32.decoder.get_inputs()[0].shape[1]))
    latents = latents.astype(np.float32)
    images = np.resize(test_images, (INVARIANCE_BATCH, test_images.shape[1]))
    if not _batch_invariant(variant.logits, latents):
        raise VariantRefused(f"{precision}: the decoder is not batch-invariant")
    if not _batch_invariant(lambda rows: variant.encode(rows)[0], images):
        raise VariantRefused(f"{precision}: the encoder is not batch-invariant")
    held_out = test_images[:GATE_IMAGES]
    elbo_fp32, iw_fp32 = paired_scores(fp32, held_out, GATE_IW_SAMPLES, seed)
    elbo, iw = paired_scores(variant, held_out, GATE_IW_SAMPLES, seed)
    hot = (2.0 * latents).astype(np.float32)
    probability_error = float(
        np.mean(np.abs(_sigmoid(variant.logits(hot)) - _sigmoid(fp32.logits(hot))))
    )
    figures = {
        "negative_elbo_cost": elbo - elbo_fp32,
        "iw_nll_cost": iw - iw_fp32,
        "temperature_2_probability_error": probability_error,
        "gate_images": float(len(held_out)),
        "gate_iw_samples": float(GATE_IW_SAMPLES),
    }
    limits = {
        "negative_elbo_cost": MAX_ELBO_COST,
        "iw_nll_cost": MAX_IW_COST,
        "temperature_2_probability_error": MAX_TEMPERATURE_ERROR,
    }
    for key, limit in limits.items():
        if not figures[key] <= limit:
            raise VariantRefused(f"{precision}: {key} {figures[key]:.4f} > {limit}")
    return figures


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def write_variants(
    directory: Path, train_images: np.ndarray, test_images: np.ndarray
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every variant that passes its gate, as {precision: {"recipe", "quality"}}, and the
    refused ones as {precision: reason}; a refused variant's files are removed. Images are
    float32 [N, 784] in [0, 1]."""
    written: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    for precision in PRECISIONS:
        if precision == "int8":
            recipe = write_int8(directory, train_images)
        else:
            recipe = write_fp16(directory)
        try:
            quality = quality_gate(directory, precision, test_images)
        except VariantRefused as reason:
            refused[precision] = str(reason)
            for network in ("encoder", "decoder"):
                (directory / f"{network}.{precision}.onnx").unlink(missing_ok=True)
            logging.getLogger(__name__).warning("variant refused: %s", reason)
            continue
        written[precision] = {"recipe": recipe, "quality": quality}
    return written, refused
