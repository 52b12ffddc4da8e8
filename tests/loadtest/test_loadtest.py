"""vae-loadtest against the no-op server: closed and open loop, every method, errors, sweeps."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from service import loadtest


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
    assert report["ok"] > 50
    assert report["errors"] == {}
    assert report["requests"] == report["ok"]
    assert 0.9 < report["elapsed_s"] < 2.0
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
    assert 0.2 < report["elapsed_s"] < 2.0  # about 100 / 200 per second
    assert report["requests_per_s"] == pytest.approx(200, rel=0.5)
    assert_latency(report)


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
    started = time.monotonic()
    status, report = run_json(
        capsys, f"--target=127.0.0.1:{port}", "--concurrency=2", "--duration=0.5", "--warmup=0",
        "--timeout=2",
    )  # fmt: skip
    assert time.monotonic() - started < 10
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
