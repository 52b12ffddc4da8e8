"""How `make bench-profile` sorts py-spy's samples into parts, on stacks as py-spy writes them."""

from __future__ import annotations

from bench.profile import OTHER, part_of, parts

LOOP = "<module> (vae-serve:6);main (service/__main__.py:68);run (uvloop/__init__.py:92)"
WORKER = "Thread._bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:83)"


def test_the_innermost_owner_with_precedence_wins() -> None:
    decode = (
        f"{WORKER};decode_sync (service/model/runtime.py:222);Session.run (onnxruntime/x.py:395)"
    )
    assert part_of(decode.split(";")) == "decoder (ONNX Runtime)"
    draw = f"{LOOP};handle (service/interceptors.py:135);prior_latents (service/sampling.py:33)"
    assert part_of(draw.split(";")) == "latent draw (numpy RNG)"
    handler = (
        f"{LOOP};Loop__run (loop.c:1);0x7f (grpc/_cython/cygrpc.so);Sample (service/servicer.py:1)"
    )
    assert part_of(handler.split(";")) == "servicer, interceptor, model lease"
    grpc_c = f"{LOOP};Loop__run (loop.c:1);0x7f (grpc/_cython/cygrpc.so);sendmsg (libc.so.6)"
    assert part_of(grpc_c.split(";")) == "gRPC (Cython and C core)"
    wake = ";".join(
        [WORKER, "Future.set_result (concurrent/futures/_base.py:550)", "uv__async_send (async.c)"]
    )
    assert part_of(wake.split(";")) == "batcher and executor hop"
    assert part_of(["thread_run (libpython3.11.so)", "0x7f (libc.so.6)"]) == OTHER


def test_waiting_threads_are_not_cpu_time() -> None:
    idle_loop = f"{LOOP};Loop__run (loop.c:1);uv__io_poll (linux.c:1);epoll_pwait (libc.so.6)"
    assert part_of(idle_loop.split(";")) is None
    idle_worker = ";".join(
        [WORKER, "_queue_SimpleQueue_get_impl (_queuemodule.c)", "PyThread_acquire_lock_timed (x)"]
    )
    assert part_of(idle_worker.split(";")) is None


def test_collapsed_lines_are_counted() -> None:
    text = (
        f"{WORKER};Session.run (onnxruntime/x.py:395) 7\n"
        f"{LOOP};epoll_wait (libc.so.6) 5\n"
        f"{LOOP};Loop__run (loop.c:1) 3\n"
    )
    counts, waiting = parts(text)
    assert counts == {"decoder (ONNX Runtime)": 7, "event loop (uvloop)": 3}
    assert waiting == 5
