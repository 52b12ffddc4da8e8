"""The live model, replaced without a restart.

`ModelHolder` holds the model version being served. Every VaeService call leases the live
version once (`acquire`, and `release` when it ends: done by the interceptor), and the servicer
reaches it through `CallModel`, so a call finishes on the version it started with even if a
reload swaps another one in meanwhile.

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
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from export.manifest import ModelError, resolve_version
from service.metrics import Metrics
from service.model.runtime import ModelInfo
from service.settings import Settings

log = logging.getLogger(__name__)


class Servable(Protocol):
    """One loaded model version (`service.model.ServedModel`)."""

    info: ModelInfo

    async def offload(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...

    def warm_up(self) -> None: ...

    def retire(self) -> None: ...

    def close(self) -> Awaitable[None] | None: ...


Loader = Callable[[Path], Servable]
"""Opens (verifies and loads, not warms) one `<repo>/<name>/<version>` directory; raises
ModelError or ProviderError."""


def default_loader(settings: Settings, metrics: Metrics | None) -> Loader:
    from service.model.served import open_model

    return lambda directory: open_model(settings, metrics, directory)


# The version the current call leased (set by `ModelHolder.acquire` in the call's own task).
_leased: ContextVar[Servable | None] = ContextVar("vae_leased_model", default=None)


@dataclass(eq=False)
class _Version:
    model: Servable
    leases: int = 0
    retired: bool = False


Lease = tuple[_Version, Token[Servable | None]]
"""What `ModelHolder.acquire` hands out and `release` takes back."""


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

    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader if loader is not None else default_loader(settings, metrics)
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
        self._live = _Version(self.loader(directory))
        self._publish(self.current.info)
        return self.current.info

    async def warm_up(self) -> None:
        await _warm(self.current)

    @property
    def current(self) -> Servable:
        if self._live is None:
            raise RuntimeError("ModelHolder.open() was not called")
        return self._live.model

    def acquire(self) -> Lease:
        """Lease the live version for one call (in the call's own task): `CallModel` resolves
        to it until `release`, and the version is not closed before then."""
        version = self._live
        if version is None:
            raise RuntimeError("ModelHolder.open() was not called")
        version.leases += 1
        return version, _leased.set(version.model)

    def release(self, lease: Lease) -> None:
        version, token = lease
        _leased.reset(token)
        version.leases -= 1
        if version.retired and version.leases == 0:
            self._close_later(version.model)

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
            old, self._live = self._live, _Version(candidate)
            self._publish(candidate.info)
            self.metrics.model_reloads.labels("success").inc()
            log.info(
                "reloaded: now serving %s version %d (was version %d)",
                candidate.info.name,
                candidate.info.version,
                live.version,
            )
            if old is not None:
                old.retired = True
                old.model.retire()  # its last calls need not wait for fuller batches
                if old.leases == 0:
                    self._close_later(old.model)
            return True

    async def _load_and_warm(self, directory: Path) -> Servable:
        """Open and warm one version off the event loop; on any failure, or if the reload is
        cancelled (shutdown), the half-made version is closed, never leaked."""
        loading = asyncio.ensure_future(asyncio.to_thread(self.loader, directory))
        try:
            candidate = await asyncio.shield(loading)
        except asyncio.CancelledError:  # the load goes on in its thread: close what it makes

            def close_when_loaded(done: asyncio.Future[Servable]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._close_later(done.result())

            loading.add_done_callback(close_when_loaded)
            raise
        try:
            await _warm(candidate)
        except BaseException as e:
            await _close(candidate)
            if isinstance(e, Exception):
                raise ModelError(f"warm-up failed: {e}") from e
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

    def _close_later(self, model: Servable) -> None:
        task = asyncio.get_running_loop().create_task(_close(model))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def _warm(model: Servable) -> None:
    result = await model.offload(model.warm_up)
    if inspect.isawaitable(result):
        await result


async def _close(model: Servable) -> None:
    try:
        if inspect.iscoroutinefunction(model.close):
            await model.close()
        else:
            await asyncio.to_thread(model.close)  # e.g. a Runtime: joins its threads
    except Exception:
        log.exception("closing model version %d failed", model.info.version)


class CallModel:
    """The servicer's model: the version the current call leased (see `ModelHolder.acquire`),
    else the live one. Attribute reads resolve per call, so `self.model.info` and
    `self.model.decode(...)` in one RPC always reach the same version."""

    def __init__(self, holder: ModelHolder) -> None:
        self._holder = holder

    def _model(self) -> Any:
        leased = _leased.get()
        return leased if leased is not None else self._holder.current

    @property
    def info(self) -> ModelInfo:
        return self._model().info  # type: ignore[no-any-return]

    async def encode(self, images: Any, **kwargs: Any) -> Any:
        return await self._model().encode(images, **kwargs)

    async def decode(self, latents: Any, **kwargs: Any) -> Any:
        return await self._model().decode(latents, **kwargs)

    async def offload(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self._model().offload(fn, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model(), name)
