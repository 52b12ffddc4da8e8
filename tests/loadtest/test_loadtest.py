"""vae-loadtest against the no-op server: closed and open loop, every method, errors, sweeps."""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client import loadtest


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    status = loadtest.main([*argv, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # one JSON object
    return status, json.loads(out[0])


def assert_latency(report: dict[str, Any]) -> None:
    lat = report["latency_ms"]
    assert set(lat) == {"p50", "p90", "p99", "p99.9", "max", "mean"}
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]


def test_closed_loop_sample(noop_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = run_json(
        capsys,
        f"--target=127.0.0.1:{noop_port}",
        "--method=sample", "--count=64", "--format=uint8",
        "--concurrency=4", "--duration=1", "--warmup=0.2", "--connections=2",
    )  # fmt: skip
    assert status == 0
    assert report["config"]["mode"] == "closed"
    assert report["config"]["concurrency"] == 4
    assert report["ok"] > 0
    assert report["errors"] == {}
    assert report["requests"] == report["ok"]
    assert report["requests_per_s"] == pytest.approx(report["ok"] / report["elapsed_s"])
    assert report["images_per_s"] == pytest.approx(64 * report["requests_per_s"])
    assert report["max_in_flight"] <= 4
    assert_latency(report)


def test_open_loop_decode_by_request_count(
    noop_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report = run_json(
        capsys,
        f"--target=127.0.0.1:{noop_port}",
        "--method=decode", "--count=8", "--format=probabilities",
        "--rate=200", "--arrivals=poisson", "--requests=100", "--warmup=0.1",
    )  # fmt: skip
    assert status == 0
    assert report["config"]["mode"] == "open"
    assert report["ok"] == 100  # exactly the measured requests asked for
    assert report["errors"] == {}
    assert report["requests_per_s"] == pytest.approx(report["ok"] / report["elapsed_s"])
    assert_latency(report)


class HeldSample(vae_pb2_grpc.VaeServiceServicer):
    """Answers Sample only once `expected` calls have arrived (or after `patience` seconds):
    a caller that waits for each reply before sending the next never gets them all in."""

    def __init__(self, expected: int, patience: float = 20.0) -> None:
        self.expected, self.patience = expected, patience
        self.arrived = 0
        self.all_in = threading.Condition()

    def Sample(
        self, request: vae_pb2.SampleRequest, context: grpc.ServicerContext
    ) -> vae_pb2.SampleResponse:
        with self.all_in:
            self.arrived += 1
            self.all_in.notify_all()
            self.all_in.wait_for(lambda: self.arrived >= self.expected, self.patience)
        return vae_pb2.SampleResponse(seed=request.seed)


def test_open_loop_sends_on_schedule_whatever_the_replies_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = 20
    servicer = HeldSample(expected=calls)  # type: ignore[abstract]  # Sample alone
    server = grpc.server(ThreadPoolExecutor(calls + 4))
    vae_pb2_grpc.add_VaeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        status, report = run_json(
            capsys,
            f"--target=127.0.0.1:{port}",
            "--method=sample", "--count=1", "--rate=200", f"--requests={calls}", "--warmup=0",
            "--timeout=60",
        )  # fmt: skip
    finally:
        server.stop(None)
    assert status == 0 and report["ok"] == calls
    # Every call was sent before the first reply came: all of them in flight at once.
    assert servicer.arrived == calls
    assert report["max_in_flight"] == calls


def test_closed_loop_waits_for_each_reply(
    noop_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report = run_json(
        capsys,
        f"--target=127.0.0.1:{noop_port}",
        "--method=sample", "--count=1", "--concurrency=3", "--requests=60", "--warmup=0",
    )  # fmt: skip
    assert status == 0 and report["ok"] == 60
    assert report["max_in_flight"] == 3  # never more than its callers


@pytest.mark.parametrize(
    ("method", "image_format"), [("encode", "uint8"), ("encode", "png"), ("info", "uint8")]
)
def test_every_method(
    noop_port: int, capsys: pytest.CaptureFixture[str], method: str, image_format: str
) -> None:
    status, report = run_json(
        capsys,
        f"--target=127.0.0.1:{noop_port}",
        f"--method={method}", "--count=4", f"--format={image_format}",
        "--concurrency=2", "--requests=20", "--warmup=0",
    )  # fmt: skip
    assert status == 0
    assert report["ok"] == 20
    assert report["images_per_s"] == (0 if method == "info" else 4 * report["requests_per_s"])


def test_unreachable_target_reports_errors_by_status(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status, report = run_json(
        capsys, f"--target=127.0.0.1:{port}", "--concurrency=2", "--duration=0.5", "--warmup=0",
        "--timeout=2",
    )  # fmt: skip
    assert status == 1  # nothing succeeded
    assert report["ok"] == 0
    assert report["errors"].get("UNAVAILABLE", 0) > 0
    assert report["latency_ms"] == {}


def test_decode_needs_model_info_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status, report = run_json(
        capsys, f"--target=127.0.0.1:{port}", "--method=decode", "--requests=1", "--timeout=2"
    )
    assert status == 2
    assert "UNAVAILABLE" in report["error"]


def test_sweep_draws_throughput_against_p99(
    noop_port: int, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "sweep.png"
    status, out = run_json(
        capsys,
        f"--target=127.0.0.1:{noop_port}",
        "--sweep=1,4", "--duration=0.3", "--warmup=0.1", f"--plot={plot}",
    )  # fmt: skip
    assert status == 0
    assert [r["config"]["concurrency"] for r in out["sweep"]] == [1, 4]
    assert all(r["ok"] > 0 for r in out["sweep"])
    assert out["plot"] == str(plot)
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_text_report(noop_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert loadtest.main([f"--target=127.0.0.1:{noop_port}", "--requests=10", "--warmup=0"]) == 0
    text = capsys.readouterr().out
    assert "10 ok, 0 failed" in text
    assert "requests/s" in text and "p99.9" in text
