"""The dynamic batcher: same results as unbatched runs, merging, splitting, limits, drops."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from service.batching.batcher import Batcher
from service.batching.hold import PROBE_EVERY
from service.errors import DeadlineExceeded, ResourceExhausted, Unavailable


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop (no pytest-asyncio needed)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=30))

    return wrapper


class Recorder:
    """Observer that keeps what it was told."""

    def __init__(self) -> None:
        self.runs: list[int] = []
        self.waits: list[float] = []
        self.depths: list[int] = []

    def observe_run(self, rows: int) -> None:
        self.runs.append(rows)

    def observe_queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def set_queue_depth(self, rows: int) -> None:
        self.depths.append(rows)


class NumpyNet:
    """A deterministic two-output "network" that records every batch and can be held shut."""

    def __init__(self, gated: bool = False) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        self.batches.append(rows.copy())
        self.started.set()
        assert self.gate.wait(10)
        return [rows * 2.0 + 1.0, rows.sum(axis=1)]

    @staticmethod
    def expected(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return rows * 2.0 + 1.0, rows.sum(axis=1)

    def computed_values(self) -> set[float]:
        return {float(v) for batch in self.batches for v in batch[:, 0]}

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 10)


def numbered(start: int, n: int) -> np.ndarray:
    """Rows whose first column is a distinct id, so a test can tell which rows were run."""
    rows = np.zeros((n, 3), np.float32)
    rows[:, 0] = np.arange(start, start + n)
    return rows


LATENT = 4  # the latent size of tests/conftest.py:tiny_model


def make(net: Callable[[np.ndarray], Any], executor: ThreadPoolExecutor, **kw: Any) -> Batcher:
    settings: dict[str, Any] = dict(max_batch_size=64, max_queue_delay=0.005, max_queue_rows=4096)
    settings.update(kw)
    return Batcher(net, executor, **settings)


@run_async
async def test_batched_results_equal_unbatched_onnx_runtime(
    decoder_session: ort.InferenceSession, executor: ThreadPoolExecutor, rng: np.random.Generator
) -> None:
    def decode(latents: np.ndarray) -> list[np.ndarray]:
        return decoder_session.run(["logits"], {"latent": latents})  # type: ignore[no-any-return]

    recorder = Recorder()
    batcher = make(
        decode, executor, max_concurrent_runs=2, max_queue_rows=10_000, observer=recorder
    )
    requests = [
        rng.standard_normal((int(n), LATENT), dtype=np.float32)
        for n in rng.integers(1, 100, size=80)
    ]
    results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    for latents, (logits,) in zip(requests, results, strict=True):
        (alone,) = decode(latents)
        assert logits.shape == (latents.shape[0], 784)
        np.testing.assert_array_equal(logits, alone)
    assert len(recorder.runs) < len(requests)  # several requests per run
    assert max(recorder.runs) <= 64
    assert sum(recorder.runs) == sum(r.shape[0] for r in requests)
    await batcher.close()


@run_async
async def test_concurrent_single_rows_share_runs(executor: ThreadPoolExecutor) -> None:
    net, recorder = NumpyNet(), Recorder()
    # A delay far beyond the test's own time limit: the calls can only finish if a full batch
    # runs at once instead of waiting the delay out.
    batcher = make(net, executor, max_batch_size=32, max_queue_delay=3600, observer=recorder)
    rows = [numbered(i, 1) for i in range(32)]
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(r) for r in rows)), 20)
    assert recorder.runs == [32]
    for r, (doubled, total) in zip(rows, results, strict=True):
        np.testing.assert_array_equal(doubled, NumpyNet.expected(r)[0])
        np.testing.assert_array_equal(total, NumpyNet.expected(r)[1])
    assert len(recorder.waits) == 32
    assert recorder.depths[-1] == 0


@run_async
async def test_delay_bounds_the_wait_for_a_partial_batch(executor: ThreadPoolExecutor) -> None:
    recorder = Recorder()
    batcher = make(NumpyNet(), executor, max_queue_delay=0.05, observer=recorder)
    await asyncio.gather(*(batcher.submit(numbered(i, 1)) for i in range(3)))
    assert recorder.runs == [3]  # one run of the partial batch, once the delay was up
    # Each row waited the delay, measured by the batcher's own observer: a lower bound (a busy
    # machine only makes a wait longer), never an upper one.
    assert len(recorder.waits) == 3 and min(recorder.waits) >= 0.04


@run_async
async def test_oversize_request_split_and_reassembled_in_order(
    executor: ThreadPoolExecutor,
) -> None:
    net, recorder = NumpyNet(), Recorder()
    batcher = make(net, executor, max_batch_size=8, max_concurrent_runs=2, observer=recorder)
    big, small = numbered(0, 30), numbered(100, 3)
    (doubled, total), (small_doubled, _) = await asyncio.gather(
        batcher.submit(big), batcher.submit(small)
    )
    np.testing.assert_array_equal(doubled, NumpyNet.expected(big)[0])
    np.testing.assert_array_equal(total, NumpyNet.expected(big)[1])
    np.testing.assert_array_equal(small_doubled, NumpyNet.expected(small)[0])
    assert recorder.runs == [8, 8, 8, 8, 1]  # the last chunk of 6 shared a run with 2 small rows
    assert all(len(b) <= 8 for b in net.batches)


@run_async
async def test_full_queue_answers_resource_exhausted_at_once(executor: ThreadPoolExecutor) -> None:
    net = NumpyNet(gated=True)
    batcher = make(net, executor, max_queue_delay=0, max_queue_rows=10, name="decoder")
    running = asyncio.create_task(batcher.submit(numbered(0, 4)))
    await net.wait_started()  # the one run slot is busy: later rows stay queued
    queued = asyncio.create_task(batcher.submit(numbered(10, 10)))
    await asyncio.sleep(0)
    assert batcher.queued_rows == 10
    # Refused while the run slot is still held shut: the refusal waits on no batch (a submit
    # that waited for room would never return before the gate opens, and time out here).
    with pytest.raises(ResourceExhausted, match="max_queue_rows 10") as info:
        await asyncio.wait_for(batcher.submit(numbered(50, 1)), 10)
    assert not net.gate.is_set() and not running.done() and not queued.done()
    assert batcher.queued_rows == 10
    assert "decoder" in str(info.value)
    net.gate.set()
    await asyncio.gather(running, queued)
    assert 50.0 not in net.computed_values()


@run_async
async def test_expired_deadline_is_never_computed(executor: ThreadPoolExecutor) -> None:
    net = NumpyNet(gated=True)
    batcher = make(net, executor, max_queue_delay=0)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(numbered(0, 1), deadline=time.monotonic() - 1)

    running = asyncio.create_task(batcher.submit(numbered(1, 1)))
    await net.wait_started()
    late = asyncio.create_task(batcher.submit(numbered(2, 2), deadline=time.monotonic() + 0.05))
    on_time = asyncio.create_task(batcher.submit(numbered(4, 1), deadline=time.monotonic() + 10))
    await asyncio.sleep(0.1)
    net.gate.set()
    with pytest.raises(DeadlineExceeded):
        await late
    await running
    (doubled, _) = await on_time
    np.testing.assert_array_equal(doubled, NumpyNet.expected(numbered(4, 1))[0])
    assert net.computed_values() == {1.0, 4.0}
    assert batcher.queued_rows == 0


@run_async
async def test_cancelled_request_is_never_computed(executor: ThreadPoolExecutor) -> None:
    net, recorder = NumpyNet(gated=True), Recorder()
    batcher = make(net, executor, max_queue_delay=0, observer=recorder)
    running = asyncio.create_task(batcher.submit(numbered(0, 1)))
    await net.wait_started()
    doomed = asyncio.create_task(batcher.submit(numbered(10, 5)))
    kept = asyncio.create_task(batcher.submit(numbered(20, 2)))
    await asyncio.sleep(0)
    assert batcher.queued_rows == 7
    doomed.cancel()
    await asyncio.sleep(0)
    assert batcher.queued_rows == 2  # the cancelled rows left the queue at once
    assert recorder.depths[-1] == 2
    net.gate.set()
    await running
    (doubled, _) = await kept
    np.testing.assert_array_equal(doubled, NumpyNet.expected(numbered(20, 2))[0])
    assert doomed.cancelled()
    assert not net.computed_values() & set(range(10, 15))


@run_async
async def test_request_cancelled_half_computed_does_not_disturb_others(
    executor: ThreadPoolExecutor,
) -> None:
    net = NumpyNet(gated=True)
    batcher = make(net, executor, max_batch_size=4, max_queue_delay=0)
    split = asyncio.create_task(batcher.submit(numbered(0, 12)))
    await net.wait_started()  # rows 0-3 are in a run; 4-11 queued
    other = asyncio.create_task(batcher.submit(numbered(100, 3)))
    await asyncio.sleep(0)
    split.cancel()
    await asyncio.sleep(0)
    assert batcher.queued_rows == 3
    net.gate.set()
    (doubled, total) = await other
    np.testing.assert_array_equal(doubled, NumpyNet.expected(numbered(100, 3))[0])
    np.testing.assert_array_equal(total, NumpyNet.expected(numbered(100, 3))[1])
    assert net.computed_values() == {0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 102.0}


@run_async
async def test_run_failure_reaches_its_callers_only(executor: ThreadPoolExecutor) -> None:
    def fragile(rows: np.ndarray) -> list[np.ndarray]:
        if (rows[:, 0] < 0).any():
            raise RuntimeError("bad batch")
        return list(NumpyNet.expected(rows))

    batcher = make(fragile, executor, max_queue_delay=0.05)
    bad = numbered(0, 2)
    bad[1, 0] = -1
    outcomes = await asyncio.gather(
        batcher.submit(bad), batcher.submit(numbered(5, 1)), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes)  # they shared the failed run
    (doubled, _) = await batcher.submit(numbered(7, 1))  # the batcher still works
    np.testing.assert_array_equal(doubled, NumpyNet.expected(numbered(7, 1))[0])


@run_async
async def test_pass_through_mode_runs_each_request_alone(
    decoder_session: ort.InferenceSession, executor: ThreadPoolExecutor, rng: np.random.Generator
) -> None:
    def decode(latents: np.ndarray) -> list[np.ndarray]:
        return decoder_session.run(["logits"], {"latent": latents})  # type: ignore[no-any-return]

    recorder = Recorder()
    batcher = make(decode, executor, enabled=False, max_batch_size=4, observer=recorder)
    requests = [rng.standard_normal((int(n), LATENT), dtype=np.float32) for n in (1, 9, 3, 30)]
    results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    for latents, (logits,) in zip(requests, results, strict=True):
        np.testing.assert_array_equal(logits, decode(latents)[0])
    assert sorted(recorder.runs) == [1, 3, 9, 30]  # one run per request, never split
    assert len(recorder.waits) == 4
    assert recorder.depths[-1] == 0
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(requests[0], deadline=time.monotonic() - 1)
    await batcher.close()
    with pytest.raises(Unavailable):
        await batcher.submit(requests[0])


@run_async
async def test_close_finishes_queued_work_then_refuses(executor: ThreadPoolExecutor) -> None:
    net = NumpyNet(gated=True)
    batcher = make(net, executor, max_batch_size=4, max_queue_delay=10.0)
    tasks = [asyncio.create_task(batcher.submit(numbered(i * 10, 3))) for i in range(5)]
    await asyncio.sleep(0)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0)
    with pytest.raises(Unavailable, match="shutting down"):
        await batcher.submit(numbered(99, 1))
    net.gate.set()
    await closing  # does not wait out the 10 s delay
    for i, task in enumerate(tasks):
        assert task.done()
        np.testing.assert_array_equal(task.result()[0], NumpyNet.expected(numbered(i * 10, 3))[0])


@run_async
async def test_rows_of_another_shape_are_refused(executor: ThreadPoolExecutor) -> None:
    batcher = make(NumpyNet(), executor)
    await batcher.submit(numbered(0, 1))
    with pytest.raises(ValueError, match="expected"):
        await batcher.submit(np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="N >= 1"):
        await batcher.submit(np.zeros((0, 3), np.float32))


@run_async
async def test_free_run_slots_share_a_large_request(executor: ThreadPoolExecutor) -> None:
    net, recorder = NumpyNet(), Recorder()
    batcher = make(net, executor, max_batch_size=64, max_concurrent_runs=2, observer=recorder)
    rows = numbered(0, 64)
    (doubled, total) = await batcher.submit(rows)
    assert recorder.runs == [32, 32]  # both workers at once, not one greedy run
    np.testing.assert_array_equal(doubled, NumpyNet.expected(rows)[0])
    np.testing.assert_array_equal(total, NumpyNet.expected(rows)[1])
    await batcher.submit(numbered(0, 8))
    assert recorder.runs[2:] == [8]  # too few rows to be worth sharing out


def test_on_uvloop_with_a_sub_millisecond_delay(executor: ThreadPoolExecutor) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def body() -> None:
        net = NumpyNet()
        batcher = make(net, executor, max_queue_delay=0.0003, max_concurrent_runs=2)
        requests = [numbered(100 * i, i % 7 + 1) for i in range(50)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        for r, (doubled, _) in zip(requests, results, strict=True):
            np.testing.assert_array_equal(doubled, NumpyNet.expected(r)[0])
        await batcher.close()

    uvloop.run(asyncio.wait_for(body(), timeout=30))


@run_async
async def test_small_runs_inline_on_the_event_loop(
    decoder_session: ort.InferenceSession, rng: np.random.Generator
) -> None:
    def decode(latents: np.ndarray) -> list[np.ndarray]:
        assert threading.current_thread() is threading.main_thread()  # never a worker
        return decoder_session.run(["logits"], {"latent": latents})  # type: ignore[no-any-return]

    recorder = Recorder()
    with ThreadPoolExecutor(1) as unused:
        for enabled in (True, False):
            batcher = make(decode, unused, inline_max_rows=64, enabled=enabled, observer=recorder)
            requests = [rng.standard_normal((n, LATENT), dtype=np.float32) for n in (1, 5, 2)]
            results = await asyncio.gather(*(batcher.submit(r) for r in requests))
            for latents, (logits,) in zip(requests, results, strict=True):
                np.testing.assert_array_equal(logits, decode(latents)[0])
            await batcher.close()
    assert sum(recorder.runs) == 16


# -- the fast path: a request alone on an idle batcher -------------------------------------


@run_async
async def test_lone_request_runs_at_once_without_a_hop(executor: ThreadPoolExecutor) -> None:
    recorder = Recorder()
    batcher = make(NumpyNet(), executor, max_queue_delay=0, inline_max_rows=4, observer=recorder)
    call = batcher.submit(numbered(0, 2))
    with pytest.raises(StopIteration) as finished:
        call.send(None)  # runs to its end without once yielding to the event loop
    doubled, total = finished.value.value
    np.testing.assert_array_equal(doubled, NumpyNet.expected(numbered(0, 2))[0])
    np.testing.assert_array_equal(total, NumpyNet.expected(numbered(0, 2))[1])
    assert recorder.runs == [2] and recorder.waits == [0.0]
    assert recorder.depths == []  # its rows were never queued
    await batcher.close()


@run_async
async def test_fast_path_respects_the_queue_bound_and_deadlines() -> None:
    with ThreadPoolExecutor(1) as pool:
        worker_free = threading.Event()
        pool.submit(worker_free.wait, 10)  # the one worker is busy: runs wait for it
        net, recorder = NumpyNet(), Recorder()
        # Two run slots: the batcher sends work to the busy executor straight from submit.
        batcher = make(
            net, pool, max_queue_delay=0, max_queue_rows=4, max_concurrent_runs=2, observer=recorder
        )
        with pytest.raises(ResourceExhausted, match="max_queue_rows 4"):
            await batcher.submit(numbered(0, 5))
        late = asyncio.create_task(batcher.submit(numbered(10, 1), time.monotonic() + 0.05))
        on_time = asyncio.create_task(batcher.submit(numbered(20, 1), time.monotonic() + 30))
        await asyncio.sleep(0.1)
        worker_free.set()
        with pytest.raises(DeadlineExceeded):
            await late
        (doubled, _) = await on_time
        np.testing.assert_array_equal(doubled, NumpyNet.expected(numbered(20, 1))[0])
        assert net.computed_values() == {20.0}  # the late one never ran
        assert recorder.runs == [1] and len(recorder.waits) == 1
        await batcher.close()


@run_async
async def test_fast_path_request_cancelled_before_its_run_is_never_computed() -> None:
    with ThreadPoolExecutor(1) as pool:
        worker_free = threading.Event()
        pool.submit(worker_free.wait, 10)
        net = NumpyNet()
        batcher = make(net, pool, max_queue_delay=0, max_concurrent_runs=2)
        doomed = asyncio.create_task(batcher.submit(numbered(10, 3)))
        await asyncio.sleep(0.01)  # it waits for the worker
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        worker_free.set()
        (doubled, _) = await batcher.submit(numbered(20, 1))
        np.testing.assert_array_equal(doubled, NumpyNet.expected(numbered(20, 1))[0])
        assert net.computed_values() == {20.0}
        await batcher.close()


@run_async
async def test_cancelled_fast_path_run_keeps_its_slot_until_it_ends(
    executor: ThreadPoolExecutor,
) -> None:
    net = NumpyNet(gated=True)
    batcher = make(net, executor, max_queue_delay=0)  # one run slot
    abandoned = asyncio.create_task(batcher.submit(numbered(0, 1)))
    await net.wait_started()
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    following = asyncio.create_task(batcher.submit(numbered(1, 2)))
    await asyncio.sleep(0)
    assert batcher.queued_rows == 2  # queued: the abandoned run still holds the slot
    net.gate.set()
    (doubled, _) = await following
    np.testing.assert_array_equal(doubled, NumpyNet.expected(numbered(1, 2))[0])
    assert batcher.queued_rows == 0
    await batcher.close()


# -- holding: partial batches wait while other callers are busy -----------------------------


def spin(seconds: float) -> None:
    """CPU work on the event loop, as a gRPC call's parsing and replying would be."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def busy_callers(batcher: Batcher, callers: int, calls: int) -> None:
    """`callers` tasks, each doing some work, then a one-row request, `calls` times."""

    async def caller(k: int) -> None:
        for j in range(calls):
            spin(0.0002)
            await asyncio.sleep(0)
            rows = numbered(1000 * k + j, 1)
            (doubled, _) = await batcher.submit(rows)
            np.testing.assert_array_equal(doubled, NumpyNet.expected(rows)[0])

    await asyncio.gather(*(caller(k) for k in range(callers)))


@run_async
async def test_busy_callers_are_held_into_shared_runs(executor: ThreadPoolExecutor) -> None:
    recorder = Recorder()
    batcher = make(
        NumpyNet(),
        executor,
        max_queue_delay=0,
        adaptive_delay=0.05,
        inline_max_rows=64,
        observer=recorder,
    )
    await busy_callers(batcher, callers=8, calls=3 * PROBE_EVERY // 8)
    fast_path_runs = PROBE_EVERY - 1  # every request alone until the first probe
    assert recorder.runs[:fast_path_runs] == [1] * fast_path_runs
    later = recorder.runs[fast_path_runs:]
    assert sum(later) / len(later) > 2  # held: the callers shared runs
    assert batcher.holding

    # The others leave: the holds gather one request each, and holding stops.
    for i in range(20):
        await batcher.submit(numbered(100_000 + i, 1))
    assert not batcher.holding
    assert recorder.runs[-5:] == [1] * 5
    await batcher.close()


@run_async
async def test_a_lone_caller_never_waits(executor: ThreadPoolExecutor) -> None:
    recorder = Recorder()
    # A hold of a minute would time this test out: only probes, which meet an idle loop.
    batcher = make(NumpyNet(), executor, max_queue_delay=0, adaptive_delay=60, observer=recorder)
    for i in range(3 * PROBE_EVERY):
        await batcher.submit(numbered(i, 1))
        assert not batcher.holding
    assert recorder.runs == [1] * (3 * PROBE_EVERY)
    await batcher.close()


@run_async
async def test_flush_stops_holding(executor: ThreadPoolExecutor) -> None:
    batcher = make(NumpyNet(), executor, max_queue_delay=0, adaptive_delay=60, inline_max_rows=4)
    await busy_callers(batcher, callers=4, calls=2 * PROBE_EVERY // 4)
    assert batcher.holding
    batcher.flush()  # a retired version: no call will come to fill its batches
    assert not batcher.holding
    await asyncio.wait_for(busy_callers(batcher, callers=4, calls=4), timeout=10)
    await batcher.close()
