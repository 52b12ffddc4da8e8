"""What `vae-loadtest` sends: the run's configuration and its requests, built once and
serialized, so the generator spends its CPU on gRPC rather than on building messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.proto.vae.v1 import vae_pb2
from vae_client.tensors import FORMATS, image_input, to_tensor

METHODS = {"sample": "Sample", "decode": "Decode", "encode": "Encode", "info": "GetModelInfo"}
PAYLOAD_VARIANTS = 4  # distinct decode/encode requests, sent in turn


@dataclass(frozen=True)
class LoadConfig:
    targets: tuple[str, ...]
    method: str = "sample"
    count: int = 1
    image_format: str = "uint8"
    concurrency: int = 1  # closed loop (when rate is None)
    rate: float | None = None  # open loop: requests per second
    arrivals: str = "constant"  # or "poisson"
    duration: float | None = 10.0  # measured seconds (after warm-up), if requests is None
    requests: int | None = None  # measured requests
    warmup: float = 1.0
    connections: int = 1
    timeout: float = 30.0  # per-call deadline, seconds
    samples_per_image: int = 0  # encode only
    latent_size: int | None = None  # decode: None asks GetModelInfo
    seed: int = 0

    @property
    def mode(self) -> str:
        return "closed" if self.rate is None else "open"

    @property
    def images_per_call(self) -> int:
        return 0 if self.method == "info" else self.count


def real_digits(count: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """`count` uint8 [count, 784] MNIST digits from the embedded 5k set, else random images."""
    try:
        from vae_data import mnist

        images = mnist.read_embedded(mnist.embedded_path()).images
        picked = images[rng.integers(0, len(images), count)]
        return np.ascontiguousarray(picked, np.uint8), "mnist (embedded 5k digits)"
    except (ImportError, AttributeError, OSError, ValueError) as exc:
        noise = rng.integers(0, 256, (count, 784), dtype=np.uint8)
        return noise, f"random images: real digits unavailable ({exc})"


def build_payloads(config: LoadConfig, latent_size: int | None) -> tuple[list[bytes], list[str]]:
    """Serialized requests for `config.method`, and notes on where their data came from.

    For encode, `--format` picks how the images travel: probabilities (float32 in [0, 1]),
    uint8 (0-255), binary (uint8 0/1) or png."""
    rng = np.random.default_rng(config.seed)
    fmt = FORMATS[config.image_format]
    notes: list[str] = []
    message: Any
    if config.method == "info":
        return [vae_pb2.GetModelInfoRequest().SerializeToString()], notes
    if config.method == "sample":
        message = vae_pb2.SampleRequest(count=config.count, format=fmt)
        return [message.SerializeToString()], notes
    payloads = []
    for _ in range(PAYLOAD_VARIANTS):
        if config.method == "decode":
            assert latent_size is not None
            latents = rng.standard_normal((config.count, latent_size), dtype=np.float32)
            message = vae_pb2.DecodeRequest(latents=to_tensor(latents), format=fmt)
        elif config.method == "encode":
            digits, source = real_digits(config.count, rng)
            if not notes:
                notes.append(f"encode images: {source}")
            message = vae_pb2.EncodeRequest(
                images=images_as(digits, config.image_format),
                samples_per_image=config.samples_per_image,
            )
        else:
            raise ValueError(f"unknown method {config.method!r}")
        payloads.append(message.SerializeToString())
    return payloads, notes


def images_as(digits: np.ndarray, image_format: str) -> vae_pb2.ImageInput:
    """uint8 [N, 784] digits as an encode input in `image_format`."""
    if image_format == "png":
        import io

        from PIL import Image  # only for png: the other formats need numpy alone

        pngs = []
        for image in digits.reshape(-1, 28, 28):
            buffer = io.BytesIO()
            Image.fromarray(image, mode="L").save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        return image_input(pngs)
    if image_format == "probabilities":
        return image_input(digits.astype(np.float32) / 255)
    if image_format == "binary":
        digits = (digits >= 128).astype(np.uint8)
    return image_input(digits)
