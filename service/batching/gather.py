"""When queued rows go to a run: one batcher's queue, and the asyncio task (the gatherer) that
empties it into runs.

- The fast path (`lets_run_alone`): a request that finds nothing queued and a run slot free
  skips the queue and runs alone, with no hop through the task, so a lone caller costs what
  the pass-through costs.
- Otherwise its rows queue, and the task starts runs as slots free up, up to
  `max_concurrent_runs` in flight (one per executor worker keeps the cores busy). Rows that
  queue while every slot is busy share the next run, so batches form under load without any
  waiting. With several slots free, the queued rows are shared out over them (runs of at least
  `MIN_SPLIT_ROWS`): a burst, or one large request, runs on every worker at once.
- Holding (`service.batching.hold`: the rules, their constants and the figures): now and then a
  fast-path request is a probe instead, and if another request joins it the batcher starts
  holding: a small partial batch waits for more rows while the event loop is busy with other
  calls, at most `adaptive_delay`. A lone caller never waits.
- `max_queue_delay` > 0 replaces all that with a fixed wait: every partial batch waits for a
  full one or that delay (no fast path, no probes), even on an idle server.
- A request whose deadline has passed when its rows would be taken is dropped (`take`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import deque

from service.batching.hold import HOLD_ROWS, Holding
from service.batching.queue import BatchObserver, Request, take
from service.batching.runs import Runs

logger = logging.getLogger(__name__)

# With several run slots free, queued rows are shared out over them in runs of at least this
# many rows (fewer rows go as one run: below this a run's fixed cost outweighs the parallelism).
MIN_SPLIT_ROWS = 16
# A batch whose delay ends within this many seconds goes now: sleeping for less would spin,
# as uvloop rounds timers to whole milliseconds (a 0.4 ms timer fires at once).
TIMER_SLACK = 0.0005
NEVER = sys.maxsize  # a row count the queue never reaches


class Gatherer:
    """The queue of one batcher and the task that starts its runs (on the loop of `start`)."""

    def __init__(
        self,
        runs: Runs,
        observer: BatchObserver,
        *,
        max_batch_size: int,
        max_queue_delay: float,
        adaptive_delay: float,
        name: str,
    ) -> None:
        self._runs = runs
        self._observer = observer
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.name = name
        self.holding = Holding(adaptive_delay)
        self.queue: deque[Request] = deque()
        self.queued_rows = 0  # rows not yet handed to a run
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        # The task sleeps on `_waiter`; `enqueue` resolves it once `queued_rows` reaches
        # `_wake_rows` (1 when idle, max_batch_size while filling a batch), and a finishing run
        # does while it `_wants_slot` (all run slots busy).
        self._waiter: asyncio.Future[None] | None = None
        self._wake_rows = 1
        self._wants_slot = False

    def start(self) -> asyncio.AbstractEventLoop:
        """Start the task on the running loop, once; the loop it runs on."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._gather(), name=f"{self.name}-batcher")
        return self._loop

    def lets_run_alone(self, n: int) -> bool:
        """Whether a request of `n` rows takes the fast path: an empty queue, no fixed delay, a
        free run slot, one run's worth, and (if few enough to hold) not held."""
        free = self._runs.free
        return (
            not self.queue
            and self.max_queue_delay == 0
            and free > 0
            and n <= self.max_batch_size
            and min(free, n // MIN_SPLIT_ROWS) <= 1  # else worth sharing out over the slots
            and (n >= HOLD_ROWS or self.holding.lets_run_now())
        )

    def enqueue(self, request: Request) -> None:
        self.queue.append(request)
        self.queued_rows += request.n
        self._observer.set_queue_depth(self.queued_rows)
        if self.queued_rows >= self._wake_rows:
            self.wake()

    def forget(self, request: Request) -> None:
        """The caller was cancelled: take its rows not yet in a run off the queue."""
        left = request.n - request.next_row
        if left:
            request.next_row = request.n
            self.queued_rows -= left
            self._observer.set_queue_depth(self.queued_rows)
            with contextlib.suppress(ValueError):  # gone if the task failed
                self.queue.remove(request)

    def flush(self) -> None:
        """No more waiting for fuller batches: no delay, no holding."""
        self.max_queue_delay = 0.0
        self.holding.stop()
        self.wake()

    async def close(self) -> None:
        """Run what is queued without waiting for more rows, wait for the runs in flight, then
        end the task."""
        self.closing = True
        if self._task is not None:
            self.wake()
            await asyncio.shield(self._task)

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def slot_freed(self) -> None:
        if self._wants_slot:
            self.wake()

    async def _sleep(
        self, wake_rows: int, timeout: float | None = None, *, wants_slot: bool = False
    ) -> None:
        """Sleep until woken (rows reached `wake_rows`, a run finished if `wants_slot`, close)
        or `timeout`."""
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._waiter, self._wake_rows, self._wants_slot = waiter, wake_rows, wants_slot
        timer = None if timeout is None else self._loop.call_later(timeout, self.wake)
        try:
            await waiter
        finally:
            self._waiter, self._wake_rows, self._wants_slot = None, 1, False
            if timer is not None:
                timer.cancel()

    async def _gather(self) -> None:
        try:
            await self._gather_forever()
        except Exception as exc:  # a bug: fail what is queued rather than leave it hanging
            logger.exception("%s: batcher task failed", self.name)
            self.closing = True
            for request in self.queue:
                if not request.future.done():
                    request.future.set_exception(exc)
            self.queue.clear()
            self.queued_rows = 0
            raise

    async def _gather_forever(self) -> None:
        runs = self._runs
        while True:
            while runs.free <= 0:
                await self._sleep(NEVER, wants_slot=True)
            while self.queued_rows == 0:
                if self.closing:
                    while runs.in_flight:
                        await self._sleep(NEVER, wants_slot=True)
                    return
                await self._sleep(1)
            head = self.queue[0]
            if head.next_row == 0:  # (the rest of a request already split goes at once)
                if self.max_queue_delay > 0:
                    await self._wait_for_rows(head.submitted)
                elif self._rows_worth_waiting() and (delay := self.holding.delay()) > 0:
                    await self.holding.wait(head.submitted, delay, self._rows_worth_waiting)
                    self.holding.ended(len(self.queue))
            self._dispatch()

    def _rows_worth_waiting(self) -> int | None:
        """The rows queued, or None if holding them is pointless: enough for a run (HOLD_ROWS
        or a full batch), an empty queue, or closing."""
        rows = self.queued_rows
        enough = min(HOLD_ROWS, self.max_batch_size)
        return rows if 0 < rows < enough and not self.closing else None

    async def _wait_for_rows(self, since: float) -> None:
        """Sleep until a full batch is queued, the delay from `since` has passed, or close."""
        while not self.closing and 0 < self.queued_rows < self.max_batch_size:
            left = since + self.max_queue_delay - time.monotonic()
            if left < TIMER_SLACK:  # uvloop's timers round to whole milliseconds
                break
            await self._sleep(self.max_batch_size, left)

    def _batch_limit(self) -> int:
        """Rows for the next run: up to max_batch_size, but shared out when several run slots
        are free, so one greedy run does not leave the other workers idle."""
        parts = min(self._runs.free, self.queued_rows // MIN_SPLIT_ROWS)
        if parts > 1:
            return min(self.max_batch_size, -(-self.queued_rows // parts))
        return self.max_batch_size

    def _dispatch(self) -> None:
        """Start a run over the next rows (those whose deadline passed are dropped)."""
        segments, total, left = take(
            self.queue, self._batch_limit(), time.monotonic(), self._observer, self.name
        )
        self.queued_rows -= left
        self._observer.set_queue_depth(self.queued_rows)
        if total:
            self._runs.start(segments, total)
