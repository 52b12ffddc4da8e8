"""`vae-serve` as a process, for what only a process shows: SIGINT drains like SIGTERM; a call
still running when the grace period ends is cut off, logged, and the server exits 0; and start-up
refuses, with exit code 1 and one line, an inconsistent manifest (bad JSON, a signature that does
not fit the latent size, folder and manifest versions that disagree), unusable TLS files and a
port in use.

Calls are held in flight without timing: with `--max-queue-delay` a lone small request waits
that long in the batch queue for a fuller batch."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from service_harness import open_channel

from bench.certificates import Pki, make_pki
from bench.servers import ServerProcess
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc

MODEL = "tiny-vae"
ONE = vae_pb2.SampleRequest(count=1, seed=1)
EXIT_TIMEOUT = 60.0  # seconds a process gets to exit: far beyond what it needs


def held_call(server: ServerProcess, channel: grpc.Channel) -> grpc.Future:
    """A Sample(1) call waiting in the decoder's queue (the server runs --max-queue-delay)."""
    future = vae_pb2_grpc.VaeServiceStub(channel).Sample.future(ONE, timeout=300)
    for _ in range(3000):  # 30 s at most
        if server.metric("vae_batch_queue_rows", queue="decoder") == 1:
            return future
        if future.done() or server.popen.poll() is not None:
            break
        time.sleep(0.01)
    raise AssertionError(f"the call was never seen held in the queue:\n{server.output()}")


def test_sigint_drains_in_flight_calls_like_sigterm(tiny_model: Path) -> None:
    repo = tiny_model.parent.parent
    with ServerProcess.start(repo, MODEL, "--grace-period=60", "--max-queue-delay=4") as server:
        server.wait_serving()
        with open_channel(server.target) as channel:
            future = held_call(server, channel)
            server.send(signal.SIGINT)
            server.wait_log("shutting down: NOT_SERVING")
            assert not future.done()  # still held in the queue when the drain began
            assert future.result(timeout=120).seed == 1  # it finishes: no call lost
        assert server.popen.wait(EXIT_TIMEOUT) == 0
        server.wait_log("stopped")
        assert "cut off" not in server.output()


def cut_off_at_the_grace_period(tiny_model: Path) -> ServerProcess:
    """A vae-serve stopped by SIGTERM with a call held far beyond its 1 s grace period: the
    call is cut off (gRPC's own status when stop(grace) runs out), the server exits 0."""
    repo = tiny_model.parent.parent
    flags = ("--grace-period=1", "--max-queue-delay=600")
    with ServerProcess.start(repo, MODEL, *flags) as server:
        server.wait_serving()
        with open_channel(server.target) as channel:
            future = held_call(server, channel)
            server.send(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as cut:
                future.result(timeout=120)  # not the 600 s it was held for
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert cut.value.details() == "Cancelling all calls"  # type: ignore[attr-defined]
        assert server.popen.wait(EXIT_TIMEOUT) == 0
        server.wait_log("stopped")
    return server


def test_a_call_running_past_the_grace_period_is_cut_off(tiny_model: Path) -> None:
    cut_off_at_the_grace_period(tiny_model)


def test_the_cut_off_calls_are_logged(tiny_model: Path) -> None:
    server = cut_off_at_the_grace_period(tiny_model)
    assert "1 inference calls were cut off at the end of the grace period" in server.output()


# ---- start-up refusals: exit code 1 and one line ----


def start_refused(repo: Path, *flags: str) -> str:
    """Run vae-serve, expect exit code 1 and no traceback; its one-line reason."""
    command = [sys.executable, "-m", "service", f"--model-repo={repo}", f"--model-name={MODEL}"]
    command += ["--host=127.0.0.1", "--port=0", "--metrics-port=-1", "--provider=cpu", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=EXIT_TIMEOUT)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    reasons = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(reasons) == 1, done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == reasons[0]  # the last word, on one line
    return reasons[0]


def version_1(tiny_model: Path, tmp_path: Path, change: Callable[[Path], None]) -> Path:
    """A repository holding a copy of the tiny model's version 1, changed by `change`."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model.parent.parent, repo)
    change(repo / MODEL / "1")
    return repo


def edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        path = directory / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))

    return change


def test_a_manifest_that_is_not_json_refuses_to_start(tiny_model: Path, tmp_path: Path) -> None:
    def truncate(directory: Path) -> None:
        path = directory / "manifest.json"
        path.write_text(path.read_text()[:100])

    reason = start_refused(version_1(tiny_model, tmp_path, truncate))
    assert "1/manifest.json: not a valid manifest: not JSON" in reason


def test_a_signature_that_does_not_fit_the_latent_size_refuses_to_start(
    tiny_model: Path, tmp_path: Path
) -> None:
    def five_wide(manifest: dict) -> None:
        manifest["decoder"]["inputs"][0]["shape"] = ["N", 5]  # the latent size is 4

    reason = start_refused(version_1(tiny_model, tmp_path, edit_manifest(five_wide)))
    assert "the decoder signature does not fit latent_size=4" in reason


def test_folder_and_manifest_versions_that_disagree_refuse_to_start(
    tiny_model: Path, tmp_path: Path
) -> None:
    def renamed(directory: Path) -> None:
        directory.rename(directory.with_name("2"))

    reason = start_refused(version_1(tiny_model, tmp_path, renamed))
    assert "the directory says version 2, the manifest says 1" in reason


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        (lambda pki, junk: (pki.server_cert, junk / "missing.key"), "cannot read a TLS file"),
        (lambda pki, junk: (junk / "garbage.pem", pki.server_key), "not a PEM certificate"),
        (lambda pki, junk: (pki.server_cert, pki.client_key), "KEY_VALUES_MISMATCH"),
    ],
    ids=["missing", "garbage", "key-of-another-certificate"],
)
def test_unusable_tls_files_refuse_to_start(
    tiny_model: Path,
    tmp_path: Path,
    pki: Pki,
    files: Callable[[Pki, Path], tuple[Path, Path]],
    reason: str,
) -> None:
    (tmp_path / "garbage.pem").write_text("not a certificate")
    cert, key = files(pki, tmp_path)
    line = start_refused(tiny_model.parent.parent, f"--tls-cert={cert}", f"--tls-key={key}")
    assert reason in line


def test_a_port_in_use_refuses_to_start(tiny_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = start_refused(tiny_model.parent.parent, f"--port={port}")
    assert f"cannot listen on 127.0.0.1:{port}" in line
