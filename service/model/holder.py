"""The live model version, replaced without a restart.

`ModelHolder` holds the model version being served. Every call leases it in one visible place,
the servicer's `with models.lease() as model:`, and runs on that `ServedModel` to its end: a
reload meanwhile swaps in another version for the calls that start later, and the old one is
closed once its last lease ends.

A reload (a new version directory found by `watch`, which polls the repository every
`reload_interval` seconds, or an explicit trigger: SIGHUP) verifies, loads and warms the new
version beside the old one, off the event loop, then swaps it in with one assignment. The old
version stops waiting for fuller batches (no new call will fill them: `retire`) and is closed
once its last leased call ends. A version that fails verification, loading or
warm-up is logged, counted (`vae_model_reloads_total{result="failure"}`) and closed; the old one
keeps serving, and the poller does not retry that version until its files change. A repository
with nothing to load (every version removed) is reported once, not at every poll, until that
changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from export.manifest import ModelError, resolve_version
from service.metrics import Metrics
from service.model.runtime import ModelInfo
from service.model.served import ServedModel, open_model
from service.settings import Settings

log = logging.getLogger(__name__)


class _Version(AbstractContextManager[ServedModel]):
    """One loaded version and the calls leasing it: entering counts a call in, exiting counts
    it out; once retired (a newer version went live), it closes after its last call."""

    def __init__(self, model: ServedModel, close_later: Callable[[ServedModel], None]) -> None:
        self.model = model
        self.leases = 0
        self.retired = False
        self._close_later = close_later

    def __enter__(self) -> ServedModel:
        self.leases += 1
        return self.model

    def __exit__(self, *exc_info: object) -> None:
        self.leases -= 1
        if self.retired and self.leases == 0:
            self._close_later(self.model)

    def retire(self) -> None:
        self.retired = True
        self.model.retire()  # its last calls need not wait for fuller batches
        if self.leases == 0:
            self._close_later(self.model)


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """What identifies a version's files on disk (name, size, mtime), to retry a rejected
    version only once it changed."""
    try:
        return tuple(
            sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir())
        )
    except OSError:
        return ()


class ModelHolder:
    """The live version, its leases, and the reloads that replace it."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._live: _Version | None = None
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._rejected: dict[Path, tuple[tuple[str, int, int], ...]] = {}
        self._nothing_to_load: str | None = None  # the last such reason, logged once

    def open(self) -> ModelInfo:
        """Load the version the settings name (blocking; raises ModelError / ProviderError
        before any port is bound). Warm it with `warm_up` before serving."""
        directory = resolve_version(
            self.settings.model_repo, self.settings.model_name, self.settings.model_version
        )
        self._live = _Version(open_model(self.settings, self.metrics, directory), self._close_later)
        self._publish(self.current.info)
        return self.current.info

    async def warm_up(self) -> None:
        """Run the live version once at the warm-up batch sizes (ModelError if it fails)."""
        await _warm(self.current)

    @property
    def current(self) -> ServedModel:
        """The live version (for what is not a call: a call leases it with `lease`)."""
        if self._live is None:
            raise RuntimeError("ModelHolder.open() was not called")
        return self._live.model

    def lease(self) -> AbstractContextManager[ServedModel]:
        """The live version for one call: `with models.lease() as model:`. The call runs on
        that version to its end, and the version is not closed before then."""
        if self._live is None:
            raise RuntimeError("ModelHolder.open() was not called")
        return self._live

    async def reload(self, *, force: bool = False) -> bool:
        """Swap in the version the settings resolve to (the newest, unless one is pinned) if it
        differs from the live one, or in any case with `force`. True if a new version went
        live; False if there was nothing to do or it was rejected."""
        async with self._lock:
            try:
                directory = resolve_version(
                    self.settings.model_repo, self.settings.model_name, self.settings.model_version
                )
            except ModelError as e:
                # An empty repository (or a pinned version gone) is said once, not every poll.
                if str(e) == self._nothing_to_load:
                    return False
                self._nothing_to_load = str(e)
                return self._reject(None, f"nothing to load: {e}")
            self._nothing_to_load = None
            live = self.current.info
            if not force and directory.name == str(live.version):
                return False
            fingerprint = _fingerprint(directory)
            if not force and self._rejected.get(directory) == fingerprint:
                return False
            log.info("reloading: loading %s beside version %d", directory, live.version)
            try:
                candidate = await self._load_and_warm(directory)
            except Exception as e:  # ModelError, ProviderError, or ONNX Runtime's own errors
                self._rejected[directory] = fingerprint
                return self._reject(directory, str(e))
            self._rejected.pop(directory, None)
            old, self._live = self._live, _Version(candidate, self._close_later)
            self._publish(candidate.info)
            self.metrics.model_reloads.labels("success").inc()
            log.info(
                "reloaded: now serving %s version %d (was version %d)",
                candidate.info.name,
                candidate.info.version,
                live.version,
            )
            if old is not None:
                old.retire()
            return True

    async def _load_and_warm(self, directory: Path) -> ServedModel:
        """Open and warm one version off the event loop; on any failure, or if the reload is
        cancelled (shutdown), the half-made version is closed, never leaked."""
        loading = asyncio.ensure_future(
            asyncio.to_thread(open_model, self.settings, self.metrics, directory)
        )
        try:
            candidate = await asyncio.shield(loading)
        except asyncio.CancelledError:  # the load goes on in its thread: close what it makes

            def close_when_loaded(done: asyncio.Future[ServedModel]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._close_later(done.result())

            loading.add_done_callback(close_when_loaded)
            raise
        try:
            await _warm(candidate)
        except BaseException:
            await _close(candidate)
            raise
        return candidate

    async def watch(self, interval: float, trigger: asyncio.Event | None = None) -> None:
        """Reload on `trigger` (forced) and, if `interval` > 0, whenever a poll every
        `interval` seconds finds a different version. Runs until cancelled."""
        trigger = trigger if trigger is not None else asyncio.Event()
        while True:
            try:
                await asyncio.wait_for(trigger.wait(), interval if interval > 0 else None)
                forced = True
                trigger.clear()
                log.info("reload requested (SIGHUP)")
            except TimeoutError:
                forced = False
            try:
                await self.reload(force=forced)
            except Exception:  # never let one bad reload stop the watcher
                log.exception("reload failed")

    async def close(self) -> None:
        """Close the live version and wait for retired ones (after the server stopped)."""
        if self._live is not None:
            self._close_later(self._live.model)
            self._live = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _reject(self, directory: Path | None, reason: str) -> bool:
        self.metrics.model_reloads.labels("failure").inc()
        self._publish(self.current.info)  # loading may have published the rejected version
        log.error(
            "reload rejected%s: %s; still serving version %d",
            f" ({directory})" if directory is not None else "",
            reason,
            self.current.info.version,
        )
        return False

    def _publish(self, info: ModelInfo) -> None:
        self.metrics.set_model(info.name, info.version, info.providers, info.precision)

    def _close_later(self, model: ServedModel) -> None:
        task = asyncio.get_running_loop().create_task(_close(model))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def _warm(model: ServedModel) -> None:
    try:
        await model.offload(model.warm_up)
    except Exception as e:  # ONNX Runtime's own errors
        raise ModelError(f"warm-up failed: {e}") from e


async def _close(model: ServedModel) -> None:
    try:
        await model.close()
    except Exception:
        log.exception("closing model version %d failed", model.info.version)
