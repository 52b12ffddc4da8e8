"""Dynamic batching: concurrent requests for one network merged into one ONNX Runtime run.

A `Batcher` owns one network's queue. Requests are counted in rows (images or latents), not
calls: a run takes up to `max_batch_size` queued rows (stacked with one `np.concatenate`) on the
executor, and each caller gets views of its own rows of every output. A request larger than
`max_batch_size` is split across runs (its chunks may share a run with other requests) and
reassembled in order: its outputs are copied once into arrays of its own, the one copy on the
way out, so keep `max_batch_size` at or above the usual request size (batch 256 to 1024 runs
as fast per row as anything larger). The run is deterministic row by row (noise and seeds are
applied by the caller, outside the batcher), so a batched result equals an unbatched one.
A batcher belongs to the event loop of its first `submit`.

When runs start:
- The fast path: a request that finds nothing queued and a run slot free goes straight from
  `submit` to a run of its own, with no hop through the gatherer task, so a lone caller costs
  what the pass-through costs.
- Otherwise its rows queue, and one asyncio task (the gatherer) starts runs as slots free up,
  up to `max_concurrent_runs` in flight (one per executor worker keeps the cores busy). Rows
  that queue while every slot is busy share the next run, so batches form under load without
  any waiting. With several slots free, the queued rows are shared out over them (runs of at
  least `MIN_SPLIT_ROWS`): a burst, or one large request, runs on every worker at once.
- Holding (`adaptive_delay`; the rules, their constants and the figures are in
  `service.batching.hold`): small requests from many callers would still each run alone, as every
  run ends before the next call reaches the batcher, and each would pay a run's fixed cost and
  gRPC's cost of waking up for a lone reply. So now and then a fast-path request is a probe: it
  waits a little, and if another request joins, the batcher starts holding. While holding, a
  small partial batch waits for more rows as long as the event loop is busy with other calls,
  at most `adaptive_delay`, and holding stops once holds gather too few requests. A lone caller
  never waits: its probes meet an idle loop and end within tens of microseconds.
- `max_queue_delay` > 0 replaces all that with a fixed wait: every partial batch waits for a
  full one or that delay (no fast path, no probes), even on an idle server.
- Runs of at most `inline_max_rows` rows are computed on the event loop itself: a run of a few
  rows costs less than the hop to a worker thread and back.

Limits and drops:
- The queue holds at most `max_queue_rows` rows not yet handed to a run; a request that does
  not fit raises `ResourceExhausted` at once.
- Deadlines are absolute `time.monotonic()` seconds (from gRPC: `time.monotonic() +
  context.time_remaining()`). A request whose deadline has passed when its rows would be taken
  (or, on the fast path, when its run starts on a worker) raises `DeadlineExceeded` and is never
  computed.
- If the task awaiting `submit` is cancelled (the client went away), its queued rows are removed
  at once; chunks of it already in a run finish but their rows are dropped, others unaffected.

Batching off (`enabled=False`) is a pass-through: one run per request, with the same queue bound
(rows submitted and not finished), deadline check (just before the run starts), inline runs and
observer calls, so the two modes are measured alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np

from service.batching.hold import HOLD_ROWS, Holding
from service.batching.queue import (
    BatchObserver,
    NullObserver,
    Outputs,
    Request,
    RunFn,
    Segment,
    as_outputs,
    fail,
    settle,
    stack,
    take,
)
from service.errors import DeadlineExceeded, ResourceExhausted, Unavailable

logger = logging.getLogger(__name__)

# With several run slots free, queued rows are shared out over them in runs of at least this
# many rows (fewer rows go as one run: below this a run's fixed cost outweighs the parallelism).
MIN_SPLIT_ROWS = 16
# A batch whose delay ends within this many seconds goes now: sleeping for less would spin,
# as uvloop rounds timers to whole milliseconds (a 0.4 ms timer fires at once).
TIMER_SLACK = 0.0005


class Batcher:
    """Merges concurrent `submit` calls for one network into runs of up to `max_batch_size`
    rows on `executor`. Create it anywhere; its task starts on the first `submit`."""

    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay: float,
        max_queue_rows: int,
        max_concurrent_runs: int = 1,
        observer: BatchObserver | None = None,
        enabled: bool = True,
        inline_max_rows: int = 0,
        adaptive_delay: float = 0.0,
        name: str = "batcher",
    ) -> None:
        """
        Args:
            run: the network, e.g. `lambda x: session.run(None, {"latent": x})`.
            executor: where runs happen, off the event loop.
            max_batch_size: most rows in one run.
            max_queue_delay: seconds every partial batch waits for more rows after the oldest
                queued one arrived (0: the adaptive policy instead). Timers have the event
                loop's resolution (uvloop: 1 ms).
            max_queue_rows: most rows waiting for a run; keep it >= the largest request
                allowed, or such a request can never be admitted.
            max_concurrent_runs: runs in flight at once; set it to the executor's workers.
            observer: metrics sink (see `BatchObserver`).
            enabled: False for the pass-through mode (one run per request).
            inline_max_rows: runs of at most this many rows run on the event loop itself,
                skipping the executor (0: never).
            adaptive_delay: longest wait of a partial batch while holding (0: never hold).
            name: the network's name, used in error messages and logs.
        """
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay < 0 or adaptive_delay < 0:
            raise ValueError("max_queue_delay and adaptive_delay must be >= 0")
        if max_queue_rows < 1:
            raise ValueError(f"max_queue_rows must be >= 1, got {max_queue_rows}")
        if max_concurrent_runs < 1:
            raise ValueError(f"max_concurrent_runs must be >= 1, got {max_concurrent_runs}")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_rows = max_queue_rows
        self.max_concurrent_runs = max_concurrent_runs
        self.enabled = enabled
        self.inline_max_rows = inline_max_rows
        self.name = name
        self._observer: BatchObserver = observer or NullObserver()

        self._queue: deque[Request] = deque()
        self._queued_rows = 0  # rows not yet handed to a run (pass-through: not finished)
        self._in_flight = 0  # runs on the executor, started and not finished
        self._row_shape: tuple[int, ...] | None = None  # fixed by the first request
        self._dtype: np.dtype | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The gatherer sleeps on `_waiter`; `submit` resolves it once `_queued_rows` reaches
        # `_wake_rows` (1 when idle, max_batch_size while filling a batch), and a finishing run
        # does while it `_wants_slot` (all run slots busy).
        self._waiter: asyncio.Future[None] | None = None
        self._wake_rows = 1
        self._never = max_queue_rows + 1  # a row count `submit` never reaches
        self._wants_slot = False
        self._runs_done: asyncio.Event | None = None
        self._holding = Holding(adaptive_delay)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def holding(self) -> bool:
        """Whether partial batches wait for more rows now (`service.batching.hold`)."""
        return self._holding.on

    async def submit(self, rows: np.ndarray, deadline: float | None = None) -> Outputs:
        """Run `rows` ([N, ...], N >= 1) through the network, batched with other requests.

        Returns one array per network output, each [N, ...]; they may be views into a larger
        batch output, so copy them before writing. Raises ResourceExhausted (queue full),
        DeadlineExceeded (`deadline`, in `time.monotonic()` seconds, passed before the rows were
        computed), Unavailable (closing), or whatever `run` raised.
        """
        if self._closing:
            raise Unavailable(f"{self.name}: shutting down, not accepting work")
        n = rows.shape[0] if rows.ndim else 0
        if n < 1:
            raise ValueError(f"{self.name}: submit needs rows of shape [N >= 1, ...]")
        self._check_rows(rows)
        if self._queued_rows + n > self.max_queue_rows:
            raise ResourceExhausted(
                f"{self.name}: queue full ({self._queued_rows} rows queued + {n} requested "
                f"> max_queue_rows {self.max_queue_rows})"
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"{self.name}: deadline passed before the request was queued")
        if not self.enabled:
            return await self._run_passing_through(rows, n, deadline, now)

        loop = self._ensure_started()
        if not self._queue and self._runs_alone(n):
            return await self._run_now(rows, n, deadline, now, loop)
        request = Request(rows, deadline, loop.create_future(), now)
        self._queue.append(request)
        self._queued_rows += n
        self._observer.set_queue_depth(self._queued_rows)
        if self._queued_rows >= self._wake_rows:
            self._wake()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._forget(request)
            raise

    def flush(self) -> None:
        """Stop waiting for fuller batches (no delay, no holding): what is queued runs as soon
        as a run slot is free. For a retired model version, whose batches no new call will
        fill."""
        self.max_queue_delay = 0.0
        self._holding.stop()
        self._wake()

    async def close(self) -> None:
        """Stop accepting work (submit raises Unavailable), run everything queued without
        waiting for more rows, wait for the runs in flight, then stop the task."""
        self._closing = True
        if self._task is not None:
            self._wake()
            await asyncio.shield(self._task)
        if self._runs_done is not None and not self.enabled:
            while self._queued_rows:  # pass-through: requests still running
                self._runs_done.clear()
                await self._runs_done.wait()

    # -- submit helpers ---------------------------------------------------------------------

    def _check_rows(self, rows: np.ndarray) -> None:
        if self._row_shape is None:
            self._row_shape, self._dtype = rows.shape[1:], rows.dtype
        elif rows.shape[1:] != self._row_shape or rows.dtype != self._dtype:
            raise ValueError(
                f"{self.name}: rows of {rows.dtype} {rows.shape[1:]}, expected "
                f"{self._dtype} {self._row_shape}"
            )

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._gather(), name=f"{self.name}-batcher")
        return self._loop

    def _forget(self, request: Request) -> None:
        """The caller was cancelled: take its rows not yet in a run off the queue."""
        left = request.n - request.next_row
        if left:
            request.next_row = request.n
            self._queued_rows -= left
            self._observer.set_queue_depth(self._queued_rows)
            with contextlib.suppress(ValueError):  # gone if the batcher task failed
                self._queue.remove(request)

    def _runs_alone(self, n: int) -> bool:
        """Whether `n` rows arriving at an empty queue take the fast path: no fixed delay, a
        free run slot, one run's worth, and (if few enough to hold) not held."""
        free = self.max_concurrent_runs - self._in_flight
        return (
            self.max_queue_delay == 0
            and free > 0
            and n <= self.max_batch_size
            and min(free, n // MIN_SPLIT_ROWS) <= 1  # else worth sharing out over the slots
            and (n >= HOLD_ROWS or self._holding.lets_run_now())
        )

    async def _run_now(
        self,
        rows: np.ndarray,
        n: int,
        deadline: float | None,
        submitted: float,
        loop: asyncio.AbstractEventLoop,
    ) -> Outputs:
        """The rows as a run of their own, inline or on the executor (observed once it ran)."""
        observer = self._observer
        if n <= self.inline_max_rows:
            inline = as_outputs(self._run(rows), n, self.name)
            observer.observe_run(n)
            observer.observe_queue_wait(0.0)
            return inline
        work = self._executor.submit(self._timed_run, rows, deadline)
        self._in_flight += 1
        try:
            started, outputs = await asyncio.wrap_future(work, loop=loop)
        except asyncio.CancelledError:
            # The caller went away; a run that started keeps its slot until it ends.
            work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._run_ended))
            raise
        except BaseException:
            self._run_ended()
            raise
        self._run_ended()
        observer.observe_run(n)
        observer.observe_queue_wait(started - submitted)
        return as_outputs(outputs, n, self.name)

    def _run_ended(self) -> None:
        self._in_flight -= 1
        if self._wants_slot:
            self._wake()

    async def _run_passing_through(
        self, rows: np.ndarray, n: int, deadline: float | None, submitted: float
    ) -> Outputs:
        """Batching off: every request runs alone, as on the fast path, its rows counted as
        queued until it ends."""
        if self._runs_done is None:
            self._runs_done = asyncio.Event()
        self._queued_rows += n
        self._observer.set_queue_depth(self._queued_rows)
        try:
            return await self._run_now(rows, n, deadline, submitted, asyncio.get_running_loop())
        finally:
            self._queued_rows -= n
            self._observer.set_queue_depth(self._queued_rows)
            self._runs_done.set()

    def _timed_run(
        self, rows: np.ndarray, deadline: float | None
    ) -> tuple[float, Sequence[np.ndarray]]:
        """A run of one request's rows; the deadline is checked as it starts."""
        started = time.monotonic()
        if deadline is not None and deadline <= started:
            raise DeadlineExceeded(f"{self.name}: deadline passed while the request was queued")
        return started, self._run(rows)

    # -- the gatherer task ------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _sleep(
        self, wake_rows: int, timeout: float | None = None, *, wants_slot: bool = False
    ) -> None:
        """Sleep until woken (rows reached `wake_rows`, a run finished if `wants_slot`, close)
        or `timeout`."""
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._waiter, self._wake_rows, self._wants_slot = waiter, wake_rows, wants_slot
        timer = None if timeout is None else self._loop.call_later(timeout, self._wake)
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
            self._closing = True
            for request in self._queue:
                if not request.future.done():
                    request.future.set_exception(exc)
            self._queue.clear()
            self._queued_rows = 0
            raise

    async def _gather_forever(self) -> None:
        while True:
            while self._in_flight >= self.max_concurrent_runs:
                await self._sleep(self._never, wants_slot=True)
            while self._queued_rows == 0:
                if self._closing:
                    while self._in_flight:
                        await self._sleep(self._never, wants_slot=True)
                    return
                await self._sleep(1)
            head = self._queue[0]
            if head.next_row == 0:  # (the rest of a request already split goes at once)
                if self.max_queue_delay > 0:
                    await self._wait_for_rows(head.submitted)
                elif self._rows_worth_waiting() and (delay := self._holding.delay()) > 0:
                    await self._holding.wait(head.submitted, delay, self._rows_worth_waiting)
                    self._holding.ended(len(self._queue))
            self._dispatch()

    def _rows_worth_waiting(self) -> int | None:
        """The rows queued, or None if holding them is pointless: enough for a run (HOLD_ROWS
        or a full batch), an empty queue, or closing."""
        rows = self._queued_rows
        enough = min(HOLD_ROWS, self.max_batch_size)
        return rows if 0 < rows < enough and not self._closing else None

    async def _wait_for_rows(self, since: float) -> None:
        """Sleep until a full batch is queued, the delay from `since` has passed, or close."""
        while not self._closing and 0 < self._queued_rows < self.max_batch_size:
            left = since + self.max_queue_delay - time.monotonic()
            if left < TIMER_SLACK:  # uvloop's timers round to whole milliseconds
                break
            await self._sleep(self.max_batch_size, left)

    def _batch_limit(self) -> int:
        """Rows for the next run: up to max_batch_size, but shared out when several run slots
        are free, so one greedy run does not leave the other workers idle."""
        free = self.max_concurrent_runs - self._in_flight
        parts = min(free, self._queued_rows // MIN_SPLIT_ROWS)
        if parts > 1:
            return min(self.max_batch_size, -(-self._queued_rows // parts))
        return self.max_batch_size

    def _dispatch(self) -> None:
        """Start a run over the next rows: inline if small, else on the executor."""
        segments, total, left = take(
            self._queue, self._batch_limit(), time.monotonic(), self._observer, self.name
        )
        self._queued_rows -= left
        self._observer.set_queue_depth(self._queued_rows)
        if not total:
            return
        if total <= self.inline_max_rows:
            self._observer.observe_run(total)
            settle(segments, lambda: self._run(stack(segments)), self.name)
            return
        assert self._loop is not None
        try:
            future = self._loop.run_in_executor(self._executor, self._run, stack(segments))
        except Exception as exc:  # e.g. the executor was shut down
            logger.exception("%s: could not start a run", self.name)
            fail(segments, exc)
            return
        self._in_flight += 1
        self._observer.observe_run(total)
        future.add_done_callback(lambda done: self._finished(done, segments))

    def _finished(self, run: asyncio.Future[Sequence[np.ndarray]], segments: list[Segment]) -> None:
        self._run_ended()
        settle(segments, run.result, self.name)
