"""The batcher's queue: the requests in it, what a run takes from it (oldest first, expired
requests dropped), and what the run owes them back (their rows of its outputs, reassembled in
order for a request split over several runs).

Kept apart from `service.batching.gather`, which decides when runs start; nothing here waits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from service.errors import DeadlineExceeded

RunFn = Callable[[np.ndarray], Sequence[np.ndarray]]
"""One synchronous run over stacked rows; row i of every output belongs to input row i."""

Outputs = tuple[np.ndarray, ...]


class BatchObserver(Protocol):
    """What the batcher reports; `service.metrics` wires it to Prometheus."""

    def observe_run(self, rows: int) -> None:
        """A run was started over `rows` rows (the batch-size histogram and runs counter)."""

    def observe_queue_wait(self, seconds: float) -> None:
        """A request waited `seconds` from `submit` until its first rows went to a run."""

    def set_queue_depth(self, rows: int) -> None:
        """Rows now queued and not yet in a run (pass-through: submitted and not finished)."""


class NullObserver:
    def observe_run(self, rows: int) -> None:
        pass

    def observe_queue_wait(self, seconds: float) -> None:
        pass

    def set_queue_depth(self, rows: int) -> None:
        pass


class Request:
    """One queued request: its rows, how far they have been handed to runs, its result."""

    __slots__ = ("deadline", "done_rows", "future", "n", "next_row", "outputs", "rows", "submitted")

    def __init__(
        self,
        rows: np.ndarray,
        deadline: float | None,
        future: asyncio.Future[Outputs],
        submitted: float,
    ) -> None:
        self.rows = rows
        self.n = rows.shape[0]
        self.deadline = deadline
        self.future = future
        self.submitted = submitted  # time.monotonic()
        self.next_row = 0  # rows before this one are in a run (or done)
        self.done_rows = 0  # rows whose outputs are written (split requests only)
        self.outputs: Outputs | None = None  # reassembly buffers (split requests only)


# A slice of a run: request, its rows [start, stop), and where they begin in the batch.
Segment = tuple[Request, int, int, int]


def take(
    queue: deque[Request], limit: int, now: float, observer: BatchObserver, name: str
) -> tuple[list[Segment], int, int]:
    """Take up to `limit` rows off the front of `queue` for a run, failing the requests whose
    deadline passed by `now`. Returns the run's segments, its rows, and the rows that left the
    queue in all (with the dropped ones)."""
    segments: list[Segment] = []
    total = left = 0
    while queue and total < limit:
        request = queue[0]
        if request.future.done():  # a split request whose earlier chunk failed
            queue.popleft()
            left += request.n - request.next_row
            request.next_row = request.n
            continue
        start = request.next_row
        if start == 0:
            if request.deadline is not None and request.deadline <= now:
                queue.popleft()
                left += request.n
                request.next_row = request.n
                request.future.set_exception(
                    DeadlineExceeded(f"{name}: deadline passed while queued")
                )
                continue
            observer.observe_queue_wait(now - request.submitted)
        stop = min(request.n, start + limit - total)
        segments.append((request, start, stop, total))
        total += stop - start
        request.next_row = stop
        if stop == request.n:
            queue.popleft()
    return segments, total, left + total


def stack(segments: list[Segment]) -> np.ndarray:
    """The run's input rows: a view for a lone request (no copy), else one concatenation."""
    if len(segments) == 1:
        request, start, stop, _ = segments[0]
        return request.rows[start:stop]
    return np.concatenate([r.rows[a:b] for r, a, b, _ in segments])


def deliver(segments: list[Segment], outputs: Outputs) -> None:
    """Hand each request its rows of the run's outputs: views for a request that fitted in
    one run, a copy into buffers of its own for one split over several."""
    for request, start, stop, offset in segments:
        if request.future.done():  # cancelled meanwhile: drop its rows
            continue
        rows = stop - start
        pieces = tuple(o[offset : offset + rows] for o in outputs)
        if rows == request.n:
            request.future.set_result(pieces)
            continue
        if request.outputs is None:  # a split request: reassemble in order
            request.outputs = tuple(np.empty((request.n, *o.shape[1:]), o.dtype) for o in outputs)
        for whole, piece in zip(request.outputs, pieces, strict=True):
            whole[start:stop] = piece
        request.done_rows += rows
        if request.done_rows == request.n:
            request.future.set_result(request.outputs)


def settle(segments: list[Segment], run: Callable[[], Sequence[np.ndarray]], name: str) -> None:
    """Call `run` (the run itself, or a finished future's `result`) and hand its outputs to
    the requests of `segments`, or what it raised to all of them."""
    total = sum(stop - start for _, start, stop, _ in segments)
    try:
        outputs = as_outputs(run(), total, name)
    except (Exception, asyncio.CancelledError) as exc:
        fail(segments, exc)
    else:
        deliver(segments, outputs)


def fail(segments: list[Segment], exc: BaseException) -> None:
    """The run failed (or was cancelled): so do the requests it carried."""
    for request, *_ in segments:
        if not request.future.done():
            if isinstance(exc, asyncio.CancelledError):
                request.future.cancel()
            else:
                request.future.set_exception(exc)


def as_outputs(outputs: Sequence[np.ndarray], rows: int, name: str) -> Outputs:
    """The run's outputs as a tuple, checked to have one row per input row."""
    result = tuple(outputs)
    for out in result:
        if not out.ndim or out.shape[0] != rows:
            raise RuntimeError(f"{name}: run returned shape {out.shape} for {rows} input rows")
    return result
