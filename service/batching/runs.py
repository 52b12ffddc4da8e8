"""Runs: starting them and counting those in flight, for one batcher.

A run of at most `inline_max_rows` rows is computed on the event loop itself: a run of a few
rows costs less than the hop to a worker thread and back. Any other takes one of
`max_concurrent_runs` slots on the executor. Every run is reported to the observer (its rows,
and the queue wait of a request that runs alone).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np

from service.batching.queue import (
    BatchObserver,
    Outputs,
    RunFn,
    Segment,
    as_outputs,
    fail,
    settle,
    stack,
)
from service.errors import DeadlineExceeded

logger = logging.getLogger(__name__)


class Runs:
    """The runs of one network: inline or on `executor`, at most `max_concurrent` there at
    once. `on_slot_freed` is called each time an executor run ends."""

    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        *,
        max_concurrent: int,
        inline_max_rows: int,
        observer: BatchObserver,
        name: str,
    ) -> None:
        self._run = run
        self._executor = executor
        self.max_concurrent = max_concurrent
        self.inline_max_rows = inline_max_rows
        self._observer = observer
        self.name = name
        self.in_flight = 0  # runs on the executor, started and not finished
        self.on_slot_freed: Callable[[], None] = lambda: None

    @property
    def free(self) -> int:
        """Executor slots free now."""
        return self.max_concurrent - self.in_flight

    async def alone(self, rows: np.ndarray, deadline: float | None, submitted: float) -> Outputs:
        """One request's rows as a run of their own, inline or on the executor (observed once it
        ran; on the executor, the deadline is checked as the run starts)."""
        n = rows.shape[0]
        observer = self._observer
        if n <= self.inline_max_rows:
            inline = as_outputs(self._run(rows), n, self.name)
            observer.observe_run(n)
            observer.observe_queue_wait(0.0)
            return inline
        loop = asyncio.get_running_loop()
        work = self._executor.submit(self._timed_run, rows, deadline)
        self.in_flight += 1
        try:
            started, outputs = await asyncio.wrap_future(work, loop=loop)
        except asyncio.CancelledError:
            # The caller went away; a run that started keeps its slot until it ends.
            work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._ended))
            raise
        except BaseException:
            self._ended()
            raise
        self._ended()
        observer.observe_run(n)
        observer.observe_queue_wait(started - submitted)
        return as_outputs(outputs, n, self.name)

    def start(self, segments: list[Segment], total: int) -> None:
        """A run over rows taken off the queue (`total` in all): inline if few, else on the
        executor. Its requests get their rows of its outputs, or its error, when it ends."""
        if total <= self.inline_max_rows:
            self._observer.observe_run(total)
            settle(segments, lambda: self._run(stack(segments)), self.name)
            return
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, self._run, stack(segments)
            )
        except Exception as exc:  # e.g. the executor was shut down
            logger.exception("%s: could not start a run", self.name)
            fail(segments, exc)
            return
        self.in_flight += 1
        self._observer.observe_run(total)
        future.add_done_callback(lambda done: self._finished(done, segments))

    def _finished(self, run: asyncio.Future[Sequence[np.ndarray]], segments: list[Segment]) -> None:
        self._ended()
        settle(segments, run.result, self.name)

    def _ended(self) -> None:
        self.in_flight -= 1
        self.on_slot_freed()

    def _timed_run(
        self, rows: np.ndarray, deadline: float | None
    ) -> tuple[float, Sequence[np.ndarray]]:
        """A run of one request's rows, on a worker; the deadline is checked as it starts."""
        started = time.monotonic()
        if deadline is not None and deadline <= started:
            raise DeadlineExceeded(f"{self.name}: deadline passed while the request was queued")
        return started, self._run(rows)
