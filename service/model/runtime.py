"""One verified model version on ONNX Runtime: loading (`Runtime.load` checks the files
against the manifest, then `graphs.py` checks the graphs' signatures against what the service
serves and runs both networks once), warm-up, and the synchronous runs the batchers call on the
inference threads (`encode_sync`, `decode_sync`, `decode_uint8_sync`, `decode_logits_sync`; ONNX
Runtime releases the GIL, so the event loop keeps serving meanwhile). Sessions and providers are
`sessions.py`'s; the batchers and the async calls in front of the runtime are `served.py`'s. No
gRPC here.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from prometheus_client import Histogram

from export.manifest import (
    FP32,
    Manifest,
    ModelError,
    open_version,
)
from service.metrics import Metrics
from service.model.graphs import (
    SERVED_IMAGE_SHAPE,
    check_signature,
    probe,
    wanted_tensors,
)
from service.model.sessions import CUDA, open_with_provider
from service.sampling import sigmoid_, to_uint8
from service.settings import Settings

log = logging.getLogger(__name__)

WARM_UP_BATCH_SIZES = (1, 64)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    latent_size: int
    image_shape: tuple[int, ...]
    providers: tuple[str, ...]  # what ONNX Runtime actually uses, not what was asked for
    metrics: dict[str, float] = field(default_factory=dict)
    precision: str = FP32
    directory: Path = Path()

    @property
    def image_size(self) -> int:
        return int(np.prod(self.image_shape))


class Runtime:
    """The encoder and decoder sessions of one verified model version."""

    def __init__(
        self,
        manifest: Manifest,
        directory: Path,
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
        *,
        workers: int,
        metrics: Metrics | None = None,
        precision: str = FP32,
    ) -> None:
        self.manifest = manifest
        self.encoder = encoder
        self.decoder = decoder
        self.metrics = metrics
        providers = tuple(decoder.get_providers())
        self.info = ModelInfo(
            name=manifest.name,
            version=manifest.version,
            latent_size=manifest.latent_size,
            image_shape=tuple(manifest.image_shape),
            providers=providers,
            metrics=dict(manifest.metrics),
            precision=precision,
            directory=directory,
        )
        self._image_input = manifest.encoder.inputs[0].name
        self._encoder_outputs = [t.name for t in manifest.encoder.outputs]
        decoder_outputs = [o.name for o in decoder.get_outputs()]
        self._latent_input = manifest.decoder.inputs[0].name
        self._logits_output = decoder_outputs[:1]
        # The graph's uint8 images where the version has them (named as `graphs.wanted_tensors`
        # checked).
        self._image_output = decoder_outputs[1:2] or None
        # The histogram children, resolved once: `labels()` costs a lock and a dict per run.
        seconds = metrics.inference_seconds if metrics is not None else None
        self._encoder_seconds = seconds.labels("encoder") if seconds is not None else None
        self._decoder_seconds = seconds.labels("decoder") if seconds is not None else None
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")

    @classmethod
    def load(cls, directory: Path, settings: Settings, metrics: Metrics | None = None) -> Runtime:
        """Verify the files of one `<repo>/<name>/<version>` directory against its manifest,
        open both sessions on the settings' provider and run them once (`graphs.probe`).

        Raises ModelError (missing, tampered or inconsistent model) or ProviderError.
        """
        version = open_version(directory, settings.precision)
        manifest = version.manifest
        if tuple(manifest.image_shape) != SERVED_IMAGE_SHAPE:
            raise ModelError(
                f"{directory}: the model is for {manifest.image_shape} images, this service "
                f"serves {list(SERVED_IMAGE_SHAPE)}"
            )
        pixels, latent = int(np.prod(SERVED_IMAGE_SHAPE)), manifest.latent_size
        sessions = {}
        for role, net in manifest.networks(settings.precision).items():
            path = directory / net.path
            session = open_with_provider(path, version.networks[role], settings)
            if role in version.malformed:  # ONNX Runtime took it; its tensors are unchecked
                raise ModelError(version.malformed[role])
            check_signature(session, net, role, path, wanted_tensors(role, net, pixels, latent))
            sessions[role] = session
        providers = sessions["decoder"].get_providers()
        if settings.provider == "auto" and CUDA not in providers:
            log.warning(
                "provider auto: CUDA is not usable here (no GPU, or missing CUDA/cuDNN "
                "libraries; --provider cuda shows ONNX Runtime's reason); running on the CPU"
            )
        log.info(
            "loaded %s version %d (%s) from %s: latent size %d, providers %s, %d ONNX Runtime "
            "thread(s) per run, %d inference worker(s)",
            manifest.name,
            manifest.version,
            settings.precision,
            directory,
            manifest.latent_size,
            providers,
            settings.intra_op_threads,
            settings.inference_workers,
        )
        runtime = cls(
            manifest,
            directory,
            sessions["encoder"],
            sessions["decoder"],
            workers=settings.inference_workers,
            metrics=metrics,
            precision=settings.precision,
        )
        try:
            probe(runtime.encoder, runtime.decoder, latent, pixels)
        except ModelError as e:
            runtime.close()
            raise ModelError(f"{directory}: {e}") from e
        return runtime

    @property
    def latent_size(self) -> int:
        return self.info.latent_size

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The inference thread pool (a batcher in front of the runtime runs on it too)."""
        return self._executor

    # Synchronous inference: called in the worker threads.

    @staticmethod
    def _timed_run(
        seconds: Histogram | None,
        session: ort.InferenceSession,
        outputs: list[str] | None,
        feed: dict[str, np.ndarray],
    ) -> list[np.ndarray]:
        start = time.perf_counter()
        result = session.run(outputs, feed)
        if seconds is not None:
            seconds.observe(time.perf_counter() - start)
        return result  # type: ignore[no-any-return]

    def encode_sync(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, log_variance = self._timed_run(
            self._encoder_seconds, self.encoder, self._encoder_outputs, {self._image_input: images}
        )
        return mean, log_variance

    def decode_sync(self, latents: np.ndarray) -> np.ndarray:
        return sigmoid_(self.decode_logits_sync(latents))

    def decode_uint8_sync(self, latents: np.ndarray) -> np.ndarray:
        """uint8 [N, pixels], round(255 * probability): the graph's own image output, or numpy
        for a version exported without it. The two agree but for a pixel a level apart here
        and there (ONNX Runtime's sigmoid and numpy's differ in the last bit), so one version
        answers a seed with the same bytes every time."""
        if self._image_output is None:
            return to_uint8(self.decode_sync(latents))
        (images,) = self._timed_run(
            self._decoder_seconds, self.decoder, self._image_output, {self._latent_input: latents}
        )
        return images  # type: ignore[no-any-return]

    def decode_logits_sync(self, latents: np.ndarray) -> np.ndarray:
        (logits,) = self._timed_run(
            self._decoder_seconds, self.decoder, self._logits_output, {self._latent_input: latents}
        )
        return logits  # type: ignore[no-any-return]

    def warm_up(self) -> None:
        """Run both networks once per warm-up batch size (first runs allocate and plan)."""
        start = time.perf_counter()
        for n in WARM_UP_BATCH_SIZES:
            images = np.full((n, self.info.image_size), 0.5, dtype=np.float32)
            self.encoder.run(None, {self._image_input: images})
            latents = np.zeros((n, self.latent_size), dtype=np.float32)
            self.decoder.run(None, {self._latent_input: latents})
        log.info("warmed up in %.1f ms", 1000 * (time.perf_counter() - start))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
