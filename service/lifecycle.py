"""The server's stop, and what keeps it from hanging: the drain, the stop of the gRPC server,
and the threads that never hold the process's exit.

The stop (`service.server.Service.stop`) is built around a gRPC core behaviour
(grpc/grpc#41785): when `server.stop()` begins, core CANCELS every call that has reached the
server but that the application has not picked up yet, and under a burst of large calls the
asyncio server picks calls up slowly. So the stop never begins while calls are still arriving
unpicked:

1. Drain (lame duck, `drain_calls`): health says NOT_SERVING, and calls are still accepted and
   served, until no call has been picked up for `DRAIN_QUIET` seconds (every call that reached
   the server has been taken up; health-aware clients have moved away), or `drain_seconds` have
   passed.
2. Stop (`stop_server`): health Watch streams end; gRPC refuses new calls (GOAWAY: clients
   retry elsewhere transparently) while in-flight calls finish within `grace_period`. Once no
   VaeService call is left (its reply sent), the rest (idle connections, open reflection
   streams) is cut at once instead of holding the grace period.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # only its counters are read here
    from service.interceptors import ServiceInterceptor

log = logging.getLogger("service.server")  # one logger for the whole start and stop

# The drain ends once no call has been picked up for this long (and the event loop turned at
# least DRAIN_QUIET_TURNS times meanwhile, so a loop that was merely blocked does not count).
DRAIN_QUIET = 0.25
DRAIN_QUIET_TURNS = 5
POLL = 0.02  # seconds between looks at the calls during a stop


class StartupError(Exception):
    """The server cannot start (e.g. its port is taken); the message says why."""


async def drain_calls(interceptor: ServiceInterceptor, most: float) -> None:
    """Serve on until no call has been picked up for DRAIN_QUIET seconds (over at least
    DRAIN_QUIET_TURNS turns of the event loop), or for `most` seconds."""
    deadline = time.monotonic() + most
    seen, turns = interceptor.picked_up, 0
    while time.monotonic() < deadline:
        if interceptor.picked_up != seen:
            seen, turns = interceptor.picked_up, 0
        elif turns >= DRAIN_QUIET_TURNS and (
            time.monotonic() - interceptor.last_pickup >= DRAIN_QUIET
        ):
            return
        turns += 1
        await asyncio.sleep(min(POLL, max(0.0, deadline - time.monotonic())))


async def stop_server(
    server: grpc.aio.Server, interceptor: ServiceInterceptor, grace: float, drained: float
) -> int:
    """server.stop: gRPC refuses new calls; in-flight ones get `grace` seconds. Once no
    VaeService call is left for two looks in a row, what remains (idle connections, open
    streams) is cut at once; at the end of the grace period, everything is. Returns how many
    inference calls the grace period cut off."""
    deadline = time.monotonic() + grace
    # gRPC's own grace ends later: the cut at `deadline` below is ours, counted first.
    stopping = asyncio.ensure_future(server.stop(grace + 1.0))
    await asyncio.sleep(0)  # stop() has begun: from here gRPC refuses new calls itself
    log.info(
        "shutting down: NOT_SERVING, refusing new calls (after %.2f s of drain); %d calls "
        "in flight get up to %.1f s",
        drained,
        interceptor.service_calls,
        grace,
    )
    idle_looks = 0
    while not stopping.done():
        await asyncio.wait({stopping}, timeout=max(0.0, min(POLL, deadline - time.monotonic())))
        left = interceptor.service_calls
        idle_looks = idle_looks + 1 if left == 0 else 0
        if idle_looks >= 2 or time.monotonic() >= deadline:
            cut = interceptor.inference_in_flight if left else 0
            if left:
                interceptor.mark_cut_off()
            await server.stop(None)  # cancels what is left, closes every connection
            await stopping
            return cut
    return 0


class DaemonThreads(concurrent.futures.ThreadPoolExecutor):
    """The event loop's default executor (`asyncio.to_thread`: model loading and hashing on a
    reload, closing a version): one daemon thread per job, and `shutdown` never waits. The
    stock executor's threads are joined at exit, so a reload hashing a huge file kept the
    process alive long after "stopped" (90 s and more, past any Kubernetes grace). A
    ThreadPoolExecutor only in name (asyncio's loop accepts nothing else): it never starts its
    pool's threads."""

    def submit(  # type: ignore[override]
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting coroutine
                future.set_exception(e)

        threading.Thread(target=run, daemon=True, name="vae-to-thread").start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # a thread still running is abandoned at exit
