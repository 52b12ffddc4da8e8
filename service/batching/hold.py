"""Holding: when a partial batch waits for more rows, under the adaptive policy of
`service.batching.gather` (`max_queue_delay` 0, `adaptive_queue_delay` > 0).

Small requests from many callers would each run alone: a run ends before the next call reaches
the batcher, so every call pays a run's fixed cost, and gRPC its cost of waking up for a lone
reply (most of what holding saves). While the batcher is holding, a partial batch waits for more
rows as long as the event loop is busy with other calls: a pass of the loop that takes
`BUSY_PASS` or more, or brings rows, means calls are being parsed or answered and will soon
submit theirs, and waiting for them costs no throughput. `IDLE_PASSES` idle passes in a row end
the wait at once (nobody is coming: four callers, say, all queued), and so does `max_delay`
after the batch's oldest request arrived. Only batches of fewer than `HOLD_ROWS` rows wait.

Holding starts when a probe catches another call: every `PROBE_EVERY`-th request that would
take the fast path is held instead, for at most `PROBE_DELAY`. It stops when holds gather fewer
than `HOLD_MIN_REQUESTS` requests on average, as two callers lose more waiting for each other
than the run they share saves. A lone caller's probe meets an idle loop and ends after a few
microseconds: it never waits.

Measured with `vae-serve` pinned to one core and `vae-loadtest` on another, Sample(1)
requests/s with batching on over off: 0.96 to 1.02 at one caller (the noise of the machine),
0.99 at two, 1.15 to 1.25 at four, 1.25 to 1.45 from eight to 64 callers (4 to 11 rows a run).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

# A pass of the event loop this long, or one that brought rows, is a busy one: an idle pass of
# uvloop takes 1 to 3 us, one that handles a step of a call tens of microseconds or more.
BUSY_PASS = 20e-6
IDLE_PASSES = 16
# A probe every this many fast-path requests: a hold of at most PROBE_DELAY seconds.
PROBE_EVERY = 256
PROBE_DELAY = 0.00025
# Holding goes on while holds gather at least this many requests on average (over the last few).
HOLD_MIN_REQUESTS = 2.5
# Only batches of fewer rows wait. A run costs a fixed ~50 us of CPU (the batcher, the hop to a
# thread and back, ONNX Runtime's call): 10 rows' worth of the fp32 decoder, 20 of the int8
# one, so 64-row calls still pay it visibly. At 512, int8 Sample(64) answered 1.33x the calls
# at 8 in flight and 1.39x at 32 (rows a run 71 -> 417 and 551), p99 lower; fp32 1.03 to 1.05
# (its runs last long enough for calls to queue and merge anyway); within the noise on two
# cores (bench/results/hold_rows_ab_*.json).
HOLD_ROWS = 512


class Holding:
    """The holding state of one batcher; `max_delay` 0 never holds."""

    def __init__(self, max_delay: float) -> None:
        self.max_delay = max_delay
        self.on = False
        self._probe_due = False
        self._until_probe = PROBE_EVERY
        self._per_hold = 0.0  # requests a hold gathers, on average while holding

    def lets_run_now(self) -> bool:
        """For a request that finds the queue empty and a run slot free: whether it may take the
        fast path. Not while holding, nor every PROBE_EVERY-th time (a probe)."""
        if self.on:
            return False
        if self.max_delay > 0:
            self._until_probe -= 1
            if self._until_probe <= 0:
                self._until_probe = PROBE_EVERY
                self._probe_due = True
                return False
        return True

    def delay(self) -> float:
        """The longest the partial batch about to run may wait for more rows (0: none)."""
        if self.on:
            return self.max_delay
        if self._probe_due:
            self._probe_due = False
            return min(PROBE_DELAY, self.max_delay)
        return 0.0

    async def wait(self, since: float, delay: float, rows: Callable[[], int | None]) -> None:
        """Wait while the event loop is busy, at most until `delay` seconds after `since`.
        `rows()` is the rows queued, or None once there is no point waiting (a full batch,
        an empty queue, closing). Each idle pass gives the CPU away (`sched_yield`): on a
        server pinned to one core, gRPC's poller thread needs it to deliver the calls waited
        for."""
        quiet = 0
        seen = rows()
        now = time.monotonic()
        while seen is not None and now - since < min(delay, self.max_delay):  # (stop() zeroes it)
            before = now
            await asyncio.sleep(0)  # one pass of the event loop
            now = time.monotonic()
            queued = rows()
            if now - before >= BUSY_PASS or queued != seen:
                quiet, seen = 0, queued
                continue
            quiet += 1
            if quiet >= IDLE_PASSES:
                break
            os.sched_yield()

    def ended(self, requests: int) -> None:
        """A hold (or probe) ended with `requests` queued: hold on, start or stop holding."""
        if not self.on:  # a probe: did another call come?
            self.on = requests > 1
            self._per_hold = HOLD_MIN_REQUESTS  # one hold of two requests ends it
        else:
            self._per_hold += (requests - self._per_hold) / 4
            self.on = self._per_hold >= HOLD_MIN_REQUESTS
        self.on = self.on and self.max_delay > 0

    def stop(self) -> None:
        """Never hold again (a retired model version: no new call will fill its batches)."""
        self.max_delay = 0.0
        self.on = False
