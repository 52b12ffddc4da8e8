"""A served model version: one verified `Runtime` with one `Batcher` per network in front of
it, and what a call awaits of it (`encode`, `decode`, `decode_uint8`, `decode_logits`,
`offload`). `open_model`
is the one place that builds it: the `ModelHolder` calls it at start and again for each new
version of a hot reload.

    model = open_model(settings, metrics, directory)
    await model.offload(model.warm_up)
    probabilities = await model.decode(latents, deadline=time.monotonic() + 5)
    await model.close()                            # after the server stopped sending work
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np

from export.manifest import resolve_version
from service.batching.batcher import Batcher
from service.metrics import Metrics
from service.model.runtime import ModelInfo, Runtime
from service.settings import Settings

P = ParamSpec("P")
T = TypeVar("T")


class ServedModel:
    """Encode and decode through their network's batcher, on the runtime's executor."""

    def __init__(self, runtime: Runtime, settings: Settings, metrics: Metrics | None) -> None:
        self.runtime = runtime
        self.info: ModelInfo = runtime.info

        def batcher(name: str, run: Callable[[np.ndarray], tuple[np.ndarray, ...]]) -> Batcher:
            return Batcher(
                run,
                runtime.executor,
                max_batch_size=settings.max_batch_size,
                max_queue_delay=settings.max_queue_delay,
                max_queue_rows=settings.max_queue_rows,
                max_concurrent_runs=settings.inference_workers,
                observer=metrics.batch_observer(name) if metrics is not None else None,
                enabled=settings.batching,
                inline_max_rows=settings.inline_max_rows,
                adaptive_delay=settings.adaptive_queue_delay,
                name=name,
            )

        self.encoder = batcher("encoder", runtime.encode_sync)
        # The decoder's logits become probabilities in the worker, once per run (in place).
        self.decoder = batcher("decoder", lambda latents: (runtime.decode_sync(latents),))
        # uint8 and PNG replies: the graph's own uint8 images, no per-pixel numpy (a queue of its
        # own, since a run asks ONNX Runtime for one output).
        self.decoder_images = batcher(
            "decoder_images", lambda latents: (runtime.decode_uint8_sync(latents),)
        )
        # Score needs the logits themselves: the same network behind a queue of its own.
        self.decoder_logits = batcher(
            "decoder_logits", lambda latents: (runtime.decode_logits_sync(latents),)
        )
        self._batchers = (self.encoder, self.decoder, self.decoder_images, self.decoder_logits)

    async def encode(
        self, images: np.ndarray, *, deadline: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """images float32 [N, 784] in [0, 1] -> (mean, log_variance) float32 [N, latent]
        (read-only views: copy before writing). `deadline`: absolute `time.monotonic()`."""
        mean, log_variance = await self.encoder.submit(images, deadline)
        return mean, log_variance

    async def decode(self, latents: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        """latents float32 [N, latent] -> Bernoulli probabilities float32 [N, 784]."""
        (probabilities,) = await self.decoder.submit(latents, deadline)
        return probabilities

    async def decode_uint8(
        self, latents: np.ndarray, *, deadline: float | None = None
    ) -> np.ndarray:
        """latents float32 [N, latent] -> images uint8 [N, 784], round(255 * probability)."""
        (images,) = await self.decoder_images.submit(latents, deadline)
        return images

    async def decode_logits(
        self, latents: np.ndarray, *, deadline: float | None = None
    ) -> np.ndarray:
        """latents float32 [N, latent] -> the decoder's Bernoulli logits float32 [N, 784]."""
        (logits,) = await self.decoder_logits.submit(latents, deadline)
        return logits

    async def offload(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run CPU-heavy work (warm-up, large conversions, scores) on the inference threads,
        off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.runtime.executor, lambda: fn(*args, **kwargs))

    def warm_up(self) -> None:
        """Run both networks at the warm-up batch sizes (blocking: offload it)."""
        self.runtime.warm_up()

    def retire(self) -> None:
        """A newer version went live: the calls still on this one stop waiting for fuller
        batches, since no new call will come to fill them."""
        for batcher in self._batchers:
            batcher.flush()

    async def close(self) -> None:
        """Finish what is queued (new work gets UNAVAILABLE), then release the threads."""
        await asyncio.gather(*(batcher.close() for batcher in self._batchers))
        self.runtime.close()


def open_model(
    settings: Settings, metrics: Metrics | None = None, directory: Path | None = None
) -> ServedModel:
    """Load and verify one `<repo>/<name>/<version>` directory (by default the version the
    settings name) and put batchers in front of it (not warmed up). Raises ModelError or
    ProviderError, like `Runtime.load`."""
    if directory is None:
        directory = resolve_version(
            settings.model_repo, settings.model_name, settings.model_version
        )
    return ServedModel(Runtime.load(directory, settings, metrics), settings, metrics)
