"""A rolling-update rehearsal on this machine: real `vae-serve` processes, a round-robin client
under steady load, SIGTERM to one of them as Kubernetes sends it, and not one failed call.

How the address list changes. In a cluster the client dials the headless Service
(`dns:///...` with round_robin) and learns of pods that come and go by re-resolving. gRPC
Python has no custom-resolver API and offline there is no DNS name we control, so the rehearsal
gives the client a static list, `ipv4:127.0.0.1:A,127.0.0.1:B,127.0.0.1:C`, in which C's slot is
the replacement pod that does not exist yet: round_robin only picks connections that are READY,
so until C listens and is up, its slot is skipped like a pod not yet in the endpoints. That is
the Deployment's `maxSurge: 1, maxUnavailable: 0`: the new pod comes up first, then an old one
is terminated. (Reusing A's port for the replacement after A exits would model a new pod taking
the old pod's IP, which Kubernetes does not do, and would leave one server during the gap.)
The channel is the one `vae_client.client` builds (`channel_options()`: round_robin, retries on
UNAVAILABLE) plus a short reconnect backoff, which stands in for re-resolution: without it,
C's slot would be retried only on gRPC's default 1 s, 1.6 s, 2.6 s, ... schedule.

A second channel has no retry policy (a plain gRPC channel with round_robin: only gRPC's own
transparent retry of a call the server never saw) and only A and B in its list: it shows what a
client without retries meets. A lets gRPC refuse new calls at the transport (GOAWAY, refused
streams), never with an answer of its own, but one gRPC core race is left: a call that reached A
in the instant its shutdown began, before A's server had taken the call up, is answered
CANCELLED by gRPC core itself (grpc/grpc#41785). So this channel may lose at most one call per
caller, CANCELLED, while A shuts down; the retrying channel retries it (`vae_client.client`'s
policy retries CANCELLED from the server as well as UNAVAILABLE). C is not in its list
because a new server listens while it warms up and answers that time's calls UNAVAILABLE; in a
cluster the pod is in no endpoint list (nor DNS answer) until its readiness probe passes, which
a static list cannot model, so only the retrying channel, like a real client, may meet C early.

The timeline, with four callers doing small Sample calls throughout:

1. A and B serve; the load is spread over both.
2. C starts (the surge pod) and the load reaches it.
3. SIGTERM to A with no preStop pause and no endpoint removal first, so this is harsher than a
   cluster: A itself must shed the client (NOT_SERVING, GOAWAY, refuse new streams, finish
   in-flight calls) and exit 0 within its drain and grace period.
4. The load goes on over B and C.

Every call's status is recorded: none may fail, each server must have answered calls in the
phases it was meant to (from its own `vae_requests_total`), and calls must succeed after A is
gone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.servers import ServerProcess, free_port
from service.proto.vae.v1 import vae_pb2_grpc
from vae_client.client import channel_options, sample_request

GRACE_PERIOD = 5.0  # seconds A's in-flight calls get after SIGTERM (VAE_GRACE_PERIOD)
# A keeps serving after SIGTERM until calls stop arriving, at most this long (VAE_DRAIN_SECONDS):
# with this rehearsal's static address list they never stop, so A drains the whole time.
DRAIN_SECONDS = 2.0
CALLERS = 2  # concurrent callers on each of the two channels
COUNT = 64  # images a call, as PNG: about 8 ms of server work, so calls are in flight at SIGTERM
PAUSE = 0.01  # seconds each caller waits between calls: steady, without starving 2 cores
CALL_TIMEOUT = 10.0
MAX_CALLS = 50_000  # bounds on the load, whatever happens to the orchestration
MAX_LOAD_SECONDS = 90.0
AFTER_EXIT = 1.0  # seconds the load runs on B and C after A is gone
# What stands in for DNS re-resolution: a slot whose server is not up yet is retried soon.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]


def sample_calls(server: ServerProcess) -> float:
    """Sample calls this server answered OK so far, from its own /metrics."""
    return server.metric("vae_requests_total", method="Sample", code="OK")


Launch = Callable[[int], ServerProcess]


@pytest.fixture
def launch(tiny_model: Path) -> Iterator[Launch]:
    """Starts `vae-serve` processes serving the tiny model; kills whatever is still running at
    the end, pass or fail."""
    started: list[ServerProcess] = []

    def start(port: int = 0) -> ServerProcess:
        server = ServerProcess.start(
            tiny_model.parent.parent,
            tiny_model.parent.name,
            "--inference-workers=1",
            f"--grace-period={GRACE_PERIOD}",
            f"--drain-seconds={DRAIN_SECONDS}",
            port=port,
        )
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            if server.popen.poll() is None:
                server.popen.kill()
        for server in started:
            server.popen.wait(10)
            server.reader.join(10)


@dataclass
class Load:
    """`CALLERS` callers per channel doing Sample calls until stopped (or bounded out),
    recording (channel, time, status) for every call."""

    channels: dict[str, grpc.Channel]
    results: list[tuple[str, float, grpc.StatusCode, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._call, args=(name, channel), daemon=True)
            for name, channel in self.channels.items()
            for _ in range(CALLERS)
        ]
        for thread in self.threads:
            thread.start()

    def _call(self, name: str, channel: grpc.Channel) -> None:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        request = sample_request(COUNT, None, None, "png", False)
        deadline = time.monotonic() + MAX_LOAD_SECONDS
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                stub.Sample(request, timeout=CALL_TIMEOUT)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
            with self.lock:
                self.results.append((name, time.monotonic(), code, details))
                if len(self.results) >= MAX_CALLS:
                    self.stop.set()
            time.sleep(PAUSE)

    def ok_between(self, name: str, start: float, end: float) -> int:
        with self.lock:
            return sum(
                1
                for n, t, code, _ in self.results
                if n == name and start <= t < end and code == grpc.StatusCode.OK
            )

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(CALL_TIMEOUT + 5)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def without_retries(options: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The options with the service config's retry policy dropped (round_robin kept)."""
    plain = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
    return [(k, plain if k == "grpc.service_config" else v) for k, v in options]


def test_rolling_update_under_load_fails_no_call(launch: Launch) -> None:
    a, b = launch(0), launch(0)
    a.wait_serving()
    b.wait_serving()
    c_port = free_port()
    old_pods = f"127.0.0.1:{a.port},127.0.0.1:{b.port}"
    client_options = channel_options() + RECONNECT_OPTIONS
    with (
        grpc.insecure_channel(
            f"ipv4:{old_pods},127.0.0.1:{c_port}", options=client_options
        ) as client,
        grpc.insecure_channel(f"ipv4:{old_pods}", options=without_retries(client_options)) as bare,
    ):
        load = Load({"client": client, "no-retry": bare})
        try:
            began = time.monotonic()
            # 1. A and B carry the load.
            wait_until(
                lambda: sample_calls(a) > 0 and sample_calls(b) > 0,
                10,
                "the load did not reach both A and B",
            )
            # 2. The surge pod C comes up in the slot reserved for it, and gets calls.
            c = launch(c_port)
            c.wait_serving()
            wait_until(lambda: sample_calls(c) > 0, 10, "the load never reached C")
            a_before = sample_calls(a)
            # 3. A is terminated under load, with calls in flight.
            wait_until(
                lambda: a.metric("vae_requests_in_flight") > 0, 10, "A never had calls in flight"
            )
            terminated = time.monotonic()
            a.popen.send_signal(signal.SIGTERM)
            try:
                a_code = a.popen.wait(DRAIN_SECONDS + GRACE_PERIOD + 5)
            except subprocess.TimeoutExpired:
                pytest.fail(f"A did not exit in its drain and grace after SIGTERM:\n{a.output()}")
            exited = time.monotonic()
            # 4. B and C carry on.
            b_at_exit, c_at_exit = sample_calls(b), sample_calls(c)
            time.sleep(AFTER_EXIT)
            b_after, c_after = sample_calls(b), sample_calls(c)
            ended = time.monotonic()
        finally:
            load.finish()

    failed = [
        (n, round(t - began, 3), code.name, details)
        for n, t, code, details in load.results
        if code != grpc.StatusCode.OK
    ]
    print(  # shown by `pytest -rP`
        f"{len(load.results)} calls, {len(failed)} failed {failed}; A exited"
        f" {exited - terminated:.2f} s after SIGTERM; Sample"
        f" calls answered: A {a_before:.0f} before SIGTERM, B {b_after:.0f}, C {c_after:.0f}"
    )
    shutdown_race = [
        f
        for f in failed
        if f[0] == "no-retry"
        and f[2] == "CANCELLED"
        and terminated - began <= f[1] <= exited - began + 1.0
    ]
    assert failed == shutdown_race and len(shutdown_race) <= CALLERS, (
        f"{len(failed)} of {len(load.results)} calls failed: {failed[:20]}"
    )
    assert len(load.results) < MAX_CALLS, "the load hit its bound before the rehearsal ended"

    a.reader.join(5)
    assert a_code == 0, a.output()
    drained = exited - terminated
    assert drained < DRAIN_SECONDS + GRACE_PERIOD, f"A took {drained:.2f} s to drain and stop"
    assert "shutting down: NOT_SERVING" in a.output() and "stopped" in a.output()

    assert a_before > 0
    assert b_after > b_at_exit and c_after > c_at_exit, "the load did not go on over B and C"
    for name in load.channels:
        assert load.ok_between(name, began, terminated) > 0, name
        assert load.ok_between(name, exited, ended) > 0, f"{name}: no call succeeded after A left"
    assert b.popen.poll() is None and c.popen.poll() is None
