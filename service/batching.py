"""Dynamic batching: concurrent requests for one network merged into one ONNX Runtime run.

A `Batcher` owns one network's queue. Requests are counted in rows (images or latents), not
calls: rows queue until `max_batch_size` of them are waiting or the oldest has waited
`max_queue_delay` seconds, then one run takes them all (stacked with one `np.concatenate`) on
the executor, and each caller gets views of its own rows of every output. A request larger than
`max_batch_size` is split across runs (its chunks may share a run with other requests) and
reassembled in order: its outputs are copied once into arrays of its own, the one copy on the
way out, so keep `max_batch_size` at or above the usual request size (batch 256 to 1024 runs
as fast per row as anything larger). The run is deterministic row by row (noise and seeds are
applied by the caller, outside the batcher), so a batched result equals an unbatched one.
A batcher belongs to the event loop of its first `submit`.

One asyncio task per batcher gathers requests; it keeps up to `max_concurrent_runs` runs in
flight (one per executor worker keeps the cores busy) and never busy-waits: it sleeps on a
future that `submit` resolves only when the gatherer has something to do. When several run
slots are free, the queued rows are shared out over them (runs of at least `MIN_SPLIT_ROWS`),
so a burst, or one large request, runs on every worker at once instead of one greedy run.

Runs of at most `inline_max_rows` rows (0 by default: none) are computed on the event loop
itself: a one-row decode costs less than the hop to a worker thread and back.

`max_queue_delay` trades latency for batch size: each run waits for a full batch or the delay.
With 0, batches still form on their own under load (rows queue while the runs are in flight)
without ever delaying a request on an idle server; that is usually the best setting.

Limits and drops:
- The queue holds at most `max_queue_rows` rows not yet handed to a run; a request that does
  not fit raises `ResourceExhausted` at once.
- Deadlines are absolute `time.monotonic()` seconds (from gRPC: `time.monotonic() +
  context.time_remaining()`). A request whose deadline has passed when its rows would be taken
  raises `DeadlineExceeded` and is never computed.
- If the task awaiting `submit` is cancelled (the client went away), its queued rows are removed
  at once; chunks of it already in a run finish but their rows are dropped, others unaffected.

Batching off (`enabled=False`) is a pass-through: one run per request on the executor, with the
same queue bound (rows submitted and not finished), deadline check (just before the run starts)
and observer calls, so the two modes are measured alike. `max_queue_delay=0` is a different
thing: no waiting, yet rows that queue while every run slot is busy still share the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Protocol

import numpy as np

from service.errors import DeadlineExceeded, ResourceExhausted, Unavailable

logger = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], Sequence[np.ndarray]]
"""One synchronous run over stacked rows; row i of every output belongs to input row i."""

Outputs = tuple[np.ndarray, ...]

# With several run slots free, queued rows are shared out over them in runs of at least this
# many rows (fewer rows go as one run: below this a run's fixed cost outweighs the parallelism).
MIN_SPLIT_ROWS = 16
# A batch whose delay ends within this many seconds goes now: sleeping for less would spin,
# as uvloop rounds timers to whole milliseconds (a 0.4 ms timer fires at once).
TIMER_SLACK = 0.0005


class BatchObserver(Protocol):
    """What the batcher reports; `service.metrics` wires it to Prometheus."""

    def observe_run(self, rows: int) -> None:
        """A run was started over `rows` rows (the batch-size histogram and runs counter)."""

    def observe_queue_wait(self, seconds: float) -> None:
        """A request waited `seconds` from `submit` until its first rows went to a run."""

    def set_queue_depth(self, rows: int) -> None:
        """Rows now queued and not yet in a run (pass-through: submitted and not finished)."""


class _NullObserver:
    def observe_run(self, rows: int) -> None:
        pass

    def observe_queue_wait(self, seconds: float) -> None:
        pass

    def set_queue_depth(self, rows: int) -> None:
        pass


class _Request:
    """One submitted request: its rows, how far they have been handed to runs, its result."""

    __slots__ = ("deadline", "done_rows", "future", "n", "next_row", "outputs", "rows", "submitted")

    def __init__(
        self, rows: np.ndarray, deadline: float | None, future: asyncio.Future[Outputs]
    ) -> None:
        self.rows = rows
        self.n = rows.shape[0]
        self.deadline = deadline
        self.future = future
        self.submitted = time.monotonic()
        self.next_row = 0  # rows before this one are in a run (or done)
        self.done_rows = 0  # rows whose outputs are written (split requests only)
        self.outputs: Outputs | None = None  # reassembly buffers (split requests only)


# A slice of a run: request, its rows [start, stop), and where they begin in the batch.
_Segment = tuple[_Request, int, int, int]


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
        name: str = "batcher",
    ) -> None:
        """
        Args:
            run: the network, e.g. `lambda x: session.run(None, {"latent": x})`.
            executor: where runs happen, off the event loop.
            max_batch_size: most rows in one run.
            max_queue_delay: seconds a run waits for more rows after the oldest queued one
                arrived (0: never wait). Timers have the event loop's resolution (uvloop: 1 ms).
            max_queue_rows: most rows waiting for a run; keep it >= the largest request
                allowed, or such a request can never be admitted.
            max_concurrent_runs: runs in flight at once; set it to the executor's workers.
            observer: metrics sink (see `BatchObserver`).
            enabled: False for the pass-through mode (one run per request).
            inline_max_rows: runs of at most this many rows run on the event loop itself,
                skipping the executor (0: never). A one-row decode takes a few tens of
                microseconds, less than the hop to a worker thread and back costs.
            name: the network's name, used in error messages and logs.
        """
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay < 0:
            raise ValueError(f"max_queue_delay must be >= 0, got {max_queue_delay}")
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
        self._observer: BatchObserver = observer or _NullObserver()

        self._queue: deque[_Request] = deque()
        self._queued_rows = 0  # rows not yet handed to a run (pass-through: not finished)
        self._in_flight = 0  # runs started and not finished
        self._row_shape: tuple[int, ...] | None = None  # fixed by the first request
        self._dtype: np.dtype | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The gatherer sleeps on `_waiter`; `submit` resolves it once `_queued_rows` reaches
        # `_wake_rows` (1 when idle, max_batch_size while filling a batch, never while all run
        # slots are busy: a finishing run wakes it then).
        self._waiter: asyncio.Future[None] | None = None
        self._wake_rows = 1
        self._runs_done: asyncio.Event | None = None

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

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
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded(f"{self.name}: deadline passed before the request was queued")
        if not self.enabled:
            return await self._run_direct(rows, n, deadline)

        loop = self._ensure_started()
        request = _Request(rows, deadline, loop.create_future())
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
        """Stop waiting for fuller batches (max_queue_delay becomes 0): what is queued runs as
        soon as a run slot is free. For a retired model version, whose batches no new call
        will fill."""
        self.max_queue_delay = 0.0
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

    def _forget(self, request: _Request) -> None:
        """The caller was cancelled: take its rows not yet in a run off the queue."""
        left = request.n - request.next_row
        if left:
            request.next_row = request.n
            self._queued_rows -= left
            self._observer.set_queue_depth(self._queued_rows)
            with contextlib.suppress(ValueError):  # gone if the batcher task failed
                self._queue.remove(request)

    async def _run_direct(self, rows: np.ndarray, n: int, deadline: float | None) -> Outputs:
        if self._runs_done is None:
            self._runs_done = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._queued_rows += n
        self._observer.set_queue_depth(self._queued_rows)
        submitted = time.monotonic()
        try:
            if n <= self.inline_max_rows:
                started, outputs = self._timed_run(rows, deadline)
            else:
                started, outputs = await loop.run_in_executor(
                    self._executor, self._timed_run, rows, deadline
                )
        finally:
            self._queued_rows -= n
            self._observer.set_queue_depth(self._queued_rows)
            self._runs_done.set()
        self._observer.observe_run(n)
        self._observer.observe_queue_wait(started - submitted)
        return _as_outputs(outputs, n, self.name)

    def _timed_run(
        self, rows: np.ndarray, deadline: float | None
    ) -> tuple[float, Sequence[np.ndarray]]:
        """Pass-through run on a worker thread; the deadline is checked as it starts."""
        started = time.monotonic()
        if deadline is not None and deadline <= started:
            raise DeadlineExceeded(f"{self.name}: deadline passed while the request was queued")
        return started, self._run(rows)

    # -- the gatherer task ------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _sleep(self, wake_rows: int, timeout: float | None = None) -> None:
        """Sleep until woken (rows reached `wake_rows`, a run finished, close) or `timeout`."""
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._waiter, self._wake_rows = waiter, wake_rows
        timer = None if timeout is None else self._loop.call_later(timeout, self._wake)
        try:
            await waiter
        finally:
            self._waiter, self._wake_rows = None, 1
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
        never = self.max_queue_rows + 1  # a row count `submit` never reaches
        while True:
            while self._in_flight >= self.max_concurrent_runs:
                await self._sleep(never)  # a finishing run wakes us
            while self._queued_rows == 0:
                if self._closing:
                    while self._in_flight:
                        await self._sleep(never)
                    return
                await self._sleep(1)
            head = self._queue[0]
            if self.max_queue_delay > 0 and head.next_row == 0:
                # Wait for a full batch, at most until the oldest queued request's delay ends
                # (the rest of a request already split goes at once).
                oldest = head.submitted
                while not self._closing and 0 < self._queued_rows < self.max_batch_size:
                    left = oldest + self.max_queue_delay - time.monotonic()
                    if left < TIMER_SLACK:  # uvloop's timers round to whole milliseconds
                        break
                    await self._sleep(self.max_batch_size, left)
            self._dispatch()

    def _batch_limit(self) -> int:
        """Rows for the next run: up to max_batch_size, but shared out when several run slots
        are free, so one greedy run does not leave the other workers idle."""
        free = self.max_concurrent_runs - self._in_flight
        parts = min(free, self._queued_rows // MIN_SPLIT_ROWS)
        if parts > 1:
            return min(self.max_batch_size, -(-self._queued_rows // parts))
        return self.max_batch_size

    def _take(self) -> tuple[list[_Segment], int]:
        """Take the next run's rows, oldest first, dropping expired requests."""
        segments: list[_Segment] = []
        total = 0
        now = time.monotonic()
        queue = self._queue
        limit = self._batch_limit()
        while queue and total < limit:
            request = queue[0]
            if request.future.done():  # a split request whose earlier chunk failed
                queue.popleft()
                self._queued_rows -= request.n - request.next_row
                request.next_row = request.n
                continue
            start = request.next_row
            if start == 0:
                if request.deadline is not None and request.deadline <= now:
                    queue.popleft()
                    self._queued_rows -= request.n
                    request.next_row = request.n
                    request.future.set_exception(
                        DeadlineExceeded(f"{self.name}: deadline passed while queued")
                    )
                    continue
                self._observer.observe_queue_wait(now - request.submitted)
            stop = min(request.n, start + limit - total)
            segments.append((request, start, stop, total))
            total += stop - start
            request.next_row = stop
            if stop == request.n:
                queue.popleft()
        self._queued_rows -= total
        self._observer.set_queue_depth(self._queued_rows)
        return segments, total

    def _dispatch(self) -> None:
        segments, total = self._take()
        if not total:
            return
        try:
            if len(segments) == 1:
                request, start, stop, _ = segments[0]
                batch = request.rows[start:stop]  # a view: no copy for a lone request
            else:
                batch = np.concatenate([r.rows[a:b] for r, a, b, _ in segments])
            assert self._loop is not None
            if total <= self.inline_max_rows:
                future = self._run_inline(batch)
            else:
                future = self._loop.run_in_executor(self._executor, self._run, batch)
        except Exception as exc:  # e.g. the executor was shut down
            logger.exception("%s: could not start a run", self.name)
            _fail(segments, exc)
            return
        self._in_flight += 1
        self._observer.observe_run(total)
        if future.done():
            self._finished(future, segments, total)
        else:
            future.add_done_callback(lambda f: self._finished(f, segments, total))

    def _run_inline(self, batch: np.ndarray) -> asyncio.Future[Sequence[np.ndarray]]:
        """A small run on the event loop itself: cheaper than the hop to a worker and back."""
        assert self._loop is not None
        future: asyncio.Future[Sequence[np.ndarray]] = self._loop.create_future()
        try:
            future.set_result(self._run(batch))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _finished(
        self, future: asyncio.Future[Sequence[np.ndarray]], segments: list[_Segment], total: int
    ) -> None:
        self._in_flight -= 1
        self._wake()
        if future.cancelled():
            _fail(segments, asyncio.CancelledError())
            return
        exc = future.exception()
        if exc is None:
            try:
                outputs = _as_outputs(future.result(), total, self.name)
            except Exception as bad:
                exc = bad
        if exc is not None:
            _fail(segments, exc)
            return
        for request, start, stop, offset in segments:
            if request.future.done():  # cancelled meanwhile: drop its rows
                continue
            rows = stop - start
            pieces = tuple(o[offset : offset + rows] for o in outputs)
            if rows == request.n:
                request.future.set_result(pieces)
                continue
            if request.outputs is None:  # a split request: reassemble in order
                request.outputs = tuple(
                    np.empty((request.n, *o.shape[1:]), o.dtype) for o in outputs
                )
            for whole, piece in zip(request.outputs, pieces, strict=True):
                whole[start:stop] = piece
            request.done_rows += rows
            if request.done_rows == request.n:
                request.future.set_result(request.outputs)


def _as_outputs(outputs: Sequence[np.ndarray], rows: int, name: str) -> Outputs:
    result = tuple(outputs)
    for out in result:
        if out.shape[:1] != (rows,):
            raise RuntimeError(f"{name}: run returned {out.shape[:1]} rows for {rows} input rows")
    return result


def _fail(segments: list[_Segment], exc: BaseException) -> None:
    for request, *_ in segments:
        if not request.future.done():
            if isinstance(exc, asyncio.CancelledError):
                request.future.cancel()
            else:
                request.future.set_exception(exc)
