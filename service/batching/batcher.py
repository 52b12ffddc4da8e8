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

The parts: this module admits requests; `gather` decides when queued rows go to a run (the
fast path, holding, the fixed delay); `runs` starts runs (small ones on the event loop itself)
and counts them; `queue` takes rows off the queue and hands the outputs back.

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
import time
from concurrent.futures import Executor

import numpy as np

from service.batching.gather import Gatherer
from service.batching.queue import BatchObserver, NullObserver, Outputs, Request, RunFn
from service.batching.runs import Runs
from service.errors import DeadlineExceeded, ResourceExhausted, Unavailable


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
        self.max_queue_rows = max_queue_rows
        self.enabled = enabled
        self.name = name
        self._observer: BatchObserver = observer or NullObserver()
        self._runs = Runs(
            run,
            executor,
            max_concurrent=max_concurrent_runs,
            inline_max_rows=inline_max_rows,
            observer=self._observer,
            name=name,
        )
        self._gatherer = Gatherer(
            self._runs,
            self._observer,
            max_batch_size=max_batch_size,
            max_queue_delay=max_queue_delay,
            adaptive_delay=adaptive_delay,
            name=name,
        )
        self._runs.on_slot_freed = self._gatherer.slot_freed
        self._row_shape: tuple[int, ...] | None = None  # fixed by the first request
        self._dtype: np.dtype | None = None
        self._running_rows = 0  # batching off: rows submitted and not finished
        self._runs_done: asyncio.Event | None = None

    @property
    def queued_rows(self) -> int:
        """Rows not yet handed to a run (batching off: submitted and not finished)."""
        return self._gatherer.queued_rows if self.enabled else self._running_rows

    @property
    def holding(self) -> bool:
        """Whether partial batches wait for more rows now (`service.batching.hold`)."""
        return self._gatherer.holding.on

    async def submit(self, rows: np.ndarray, deadline: float | None = None) -> Outputs:
        """Run `rows` ([N, ...], N >= 1) through the network, batched with other requests.

        Returns one array per network output, each [N, ...]; they may be views into a larger
        batch output, so copy them before writing. Raises ResourceExhausted (queue full),
        DeadlineExceeded (`deadline`, in `time.monotonic()` seconds, passed before the rows were
        computed), Unavailable (closing), or whatever `run` raised.
        """
        gatherer = self._gatherer
        if gatherer.closing:
            raise Unavailable(f"{self.name}: shutting down, not accepting work")
        n = rows.shape[0] if rows.ndim else 0
        if n < 1:
            raise ValueError(f"{self.name}: submit needs rows of shape [N >= 1, ...]")
        self._check_rows(rows)
        queued = self.queued_rows
        if queued + n > self.max_queue_rows:
            raise ResourceExhausted(
                f"{self.name}: queue full ({queued} rows queued + {n} requested "
                f"> max_queue_rows {self.max_queue_rows})"
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"{self.name}: deadline passed before the request was queued")
        if not self.enabled:
            return await self._run_passing_through(rows, deadline, now)

        loop = gatherer.start()
        if gatherer.lets_run_alone(n):
            return await self._runs.alone(rows, deadline, now)
        request = Request(rows, deadline, loop.create_future(), now)
        gatherer.enqueue(request)
        try:
            return await request.future
        except asyncio.CancelledError:
            gatherer.forget(request)
            raise

    def flush(self) -> None:
        """Stop waiting for fuller batches (no delay, no holding): what is queued runs as soon
        as a run slot is free. For a retired model version, whose batches no new call will
        fill."""
        self._gatherer.flush()

    async def close(self) -> None:
        """Stop accepting work (submit raises Unavailable), run everything queued without
        waiting for more rows, wait for the runs in flight, then stop the task."""
        await self._gatherer.close()
        if self._runs_done is not None and not self.enabled:
            while self._running_rows:  # pass-through: requests still running
                self._runs_done.clear()
                await self._runs_done.wait()

    def _check_rows(self, rows: np.ndarray) -> None:
        if self._row_shape is None:
            self._row_shape, self._dtype = rows.shape[1:], rows.dtype
        elif rows.shape[1:] != self._row_shape or rows.dtype != self._dtype:
            raise ValueError(
                f"{self.name}: rows of {rows.dtype} {rows.shape[1:]}, expected "
                f"{self._dtype} {self._row_shape}"
            )

    async def _run_passing_through(
        self, rows: np.ndarray, deadline: float | None, submitted: float
    ) -> Outputs:
        """Batching off: every request runs alone, as on the fast path, its rows counted as
        queued until it ends."""
        if self._runs_done is None:
            self._runs_done = asyncio.Event()
        n = rows.shape[0]
        self._running_rows += n
        self._observer.set_queue_depth(self._running_rows)
        try:
            return await self._runs.alone(rows, deadline, submitted)
        finally:
            self._running_rows -= n
            self._observer.set_queue_depth(self._running_rows)
            self._runs_done.set()
