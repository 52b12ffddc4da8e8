"""The CPU image, run for real: as Kubernetes runs it (read-only root, non-root user), with the
model baked in and with a repository that `make model` exported mounted; then its drain, a
rolling update of two containers, and the rendered CPU overlay through `podman kube play`."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.servers import free_port, scrape
from service.proto.vae.v1 import vae_pb2_grpc
from tests.image.container import REPO, SERVICE, STOP_TIMEOUT, Container, podman
from vae_client.client import VaeClient, channel_options, sample_request

RunContainer = Callable[..., Container]
MAX_LOAD_SECONDS = 120.0  # bounds on every load below, whatever happens to the orchestration
ENDPOINT_LAG = 1.0  # seconds callers go on sending to a pod after its SIGTERM


def json_log_records(container: Container) -> list[dict[str, object]]:
    """Every line the container wrote, each parsed as JSON (fails on a line that is not)."""
    records = []
    for line in container.logs().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"{container.name} wrote a line that is not JSON: {line!r}")
    assert not [r for r in records if "Traceback" in json.dumps(r)], "a traceback was logged"
    return records


def exercise(container: Container) -> None:
    """Every RPC through the SDK, and the metrics that counted them, from the host's side."""
    with VaeClient(container.target) as vae:
        info = vae.info()
        sampled = vae.sample(8, seed=3, return_latents=True)
        assert isinstance(sampled.images, np.ndarray)
        assert sampled.images.shape == (8, 28, 28) and sampled.images.dtype == np.uint8
        assert sampled.latents is not None and sampled.latents.shape == (8, info.latent_size)
        encoded = vae.encode(sampled.images)
        assert encoded.mean.shape == (8, info.latent_size)
        decoded = vae.decode(sampled.latents, image_format="probabilities")
        assert isinstance(decoded.images, np.ndarray)
        assert decoded.images.shape == (8, 28, 28)
        # The same seed gives the same images: the image runs the model it was given.
        assert np.array_equal(vae.sample(8, seed=3).images, sampled.images)
        scores = vae.score(sampled.images, importance_samples=8, seed=1)
        assert np.all(np.isfinite(scores.negative_elbo))
    for method in ("GetModelInfo", "Sample", "Encode", "Decode", "Score"):
        assert container.metric("vae_requests_total", method=method, code="OK") >= 1, method


def server_memory(container: Container) -> dict[str, int]:
    """VmRSS and VmHWM of the server (PID 1 in the container), in bytes."""
    status = podman("exec", container.name, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def test_the_baked_image_serves_read_only_as_a_non_root_user(
    images: tuple[str, str], run_container: RunContainer, figures: dict[str, Any]
) -> None:
    baked, _ = images
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", baked).stdout)
    assert config["User"] == "10001:10001"
    container = run_container(baked).wait_serving()
    assert podman("exec", container.name, "id", "-u").stdout.strip() == "10001"
    refused = podman("exec", container.name, "touch", "/opt/venv/x", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    exercise(container)
    records = json_log_records(container)
    assert any(str(r["message"]).startswith("SERVING") for r in records)
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")]

    # Figures for deploy/README.md: start-up, memory after the calls, the image's size.
    starts = [container.serving_after]
    for _ in range(2):
        again = run_container(baked).wait_serving()
        starts.append(again.serving_after)
    with VaeClient(container.target) as vae:
        for _ in range(20):
            vae.sample(1024, seed=1)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", baked).stdout)
    python = podman("run", "--rm", "--entrypoint", "python", baked, "--version").stdout.strip()
    figures.update(
        image=baked,
        image_bytes=size,
        python=python,
        start_to_serving_seconds=sorted(round(s, 2) for s in starts),
        memory_after_20_sample_1024=server_memory(container),
        podman=podman("--version").stdout.strip(),
    )


def test_two_workers_serve_from_the_read_only_image_and_stop_on_sigterm(
    images: tuple[str, str], run_container: RunContainer
) -> None:
    """`VAE_WORKERS=2` as the supervisor's PID 1 in the container: its metric files go to the
    /tmp tmpfs (the root is read-only), the metrics are the workers' sums, and `podman stop`
    drains both."""
    baked, _ = images
    container = run_container(baked, "--env", "VAE_WORKERS=2").wait_serving()
    deadline = time.monotonic() + 60
    while "with 2 workers" not in container.logs() and time.monotonic() < deadline:
        time.sleep(0.2)  # health answered from one worker; the supervisor says when both are up
    exercise(container)
    samples = scrape(f"http://127.0.0.1:{container.metrics_port}/metrics")
    workers = {dict(labels)["pid"] for name, labels in samples if name == "vae_model_info"}
    assert len(workers) == 2, samples
    code, _ = container.stop()
    assert code == 0, container.logs()[-2000:]
    records = json_log_records(container)
    assert {r.get("worker") for r in records} == {None, 0, 1}
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert any(r["message"] == "stopped 2 workers" for r in records)


def test_a_freshly_exported_repository_serves_mounted_read_only(
    images: tuple[str, str], run_container: RunContainer, model_repo: Path
) -> None:
    _, mounted = images
    versions = sorted(model_repo.glob("mnist-vae/*/manifest.json"))
    assert versions, f"no exported version under {model_repo}: `make model` first"
    container = run_container(mounted, "--volume", f"{model_repo}:/models:ro").wait_serving()
    exercise(container)
    with VaeClient(container.target) as vae:
        assert vae.info().version == max(int(v.parent.name) for v in versions)
    json_log_records(container)


@pytest.mark.parametrize(
    "layout",
    ["empty repository", "a version folder without a manifest", "a manifest that is not JSON"],
)
def test_a_broken_model_repository_ends_the_container_with_one_json_line(
    images: tuple[str, str], run_container: RunContainer, tmp_path: Path, layout: str
) -> None:
    _, mounted = images
    if layout != "empty repository":
        version = tmp_path / "mnist-vae" / "1"
        version.mkdir(parents=True)
        if layout == "a manifest that is not JSON":
            (version / "manifest.json").write_text("{not json")
    tmp_path.chmod(0o755)
    container = run_container(mounted, "--volume", f"{tmp_path}:/models:ro")
    deadline = time.monotonic() + 60
    while container.state()["Status"] != "exited" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert container.state()["ExitCode"] == 1
    errors = [r for r in json_log_records(container) if r["level"] == "ERROR"]
    assert len(errors) == 1 and str(errors[0]["message"]).startswith("cannot start:"), errors


class Load:
    """`callers` threads calling Sample(count) on `target` until stopped; each call's status
    (and whether it was in flight when `mark()` was called) is kept."""

    def __init__(self, target: str, callers: int, count: int, *, retries: bool) -> None:
        # A short reconnect backoff stands in for DNS re-resolution: a slot whose server is
        # not up yet is retried soon (gRPC's default schedule is 1 s, 1.6 s, 2.6 s, ...).
        backoff = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 300),
        ]
        options = [*channel_options(), *backoff] if retries else [("grpc.enable_retries", 0)]
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = vae_pb2_grpc.VaeServiceStub(self.channel)
        self.count = count
        self.codes: Counter[str] = Counter()
        self.in_flight: set[int] = set()
        self.marked: set[int] = set()  # calls in flight at mark()
        self.marked_codes: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._call, daemon=True) for _ in range(callers)]
        self.deadline = time.monotonic() + MAX_LOAD_SECONDS
        self.next_id = 0

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)
        self.channel.close()

    def _call(self) -> None:
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                call, self.next_id = self.next_id, self.next_id + 1
                self.in_flight.add(call)
            try:
                self.stub.Sample(sample_request(self.count, None, None, "uint8", False), timeout=30)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
                time.sleep(0.01)  # a refused call returns at once: no busy loop on a gone server
            with self.lock:
                self.in_flight.discard(call)
                self.codes[code] += 1
                if call in self.marked:
                    self.marked_codes[code] += 1

    def mark(self) -> int:
        with self.lock:
            self.marked = set(self.in_flight)
            return len(self.marked)

    def wait_calls(self, n: int) -> None:
        deadline = time.monotonic() + 60
        while self.codes.total() < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.codes.total() >= n, f"only {self.codes} calls in 60 s"


def test_stop_under_load_finishes_every_call_in_flight_and_exits_0(
    images: tuple[str, str], run_container: RunContainer, figures: dict[str, Any]
) -> None:
    """`podman stop` (SIGTERM) with 8 callers of Sample(1024) in flight, as a pod is stopped in
    a cluster: the callers go on sending for ENDPOINT_LAG seconds after the signal (the time
    the endpoint removal takes to reach them), then send no more. The server drains: every call
    it received, in flight at SIGTERM or sent during the lag, is answered OK; it exits 0 once
    the calls stop arriving. (A caller that never stops sending meets gRPC core's race at the
    drain's end, grpc/grpc#41785: the rolling update below, whose client retries, covers it.)"""
    baked, _ = images
    container = run_container(baked).wait_serving()
    stopped: dict[str, tuple[int, float]] = {}
    stopping = threading.Thread(target=lambda: stopped.update(result=container.stop()))
    with Load(container.target, callers=8, count=1024, retries=False) as load:
        load.wait_calls(16)
        in_flight = load.mark()
        stopping.start()
        time.sleep(ENDPOINT_LAG)
        load.stopping.set()
        stopping.join(STOP_TIMEOUT + 30)
    code, seconds = stopped["result"]
    assert code == 0, container.logs()[-2000:]
    assert in_flight >= 4, "the load should keep calls in flight at SIGTERM"
    assert load.marked_codes == Counter(OK=in_flight), load.marked_codes
    assert set(load.codes) == {"OK"}, load.codes  # those sent during the lag as well
    records = json_log_records(container)
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    figures["stop_under_load"] = {
        "in_flight_at_sigterm": in_flight,
        "endpoint_lag_seconds": ENDPOINT_LAG,
        "calls": dict(load.codes),
        "stop_seconds": round(seconds, 2),
    }


def test_rolling_update_of_two_containers_under_load_fails_no_call(
    images: tuple[str, str], run_container: RunContainer, figures: dict[str, Any]
) -> None:
    """Two containers serve; each is replaced in turn, the new one up before the old one gets
    SIGTERM (maxSurge 1, maxUnavailable 0). The client holds all four slots in a round-robin
    list (a slot with nothing listening is skipped, like a pod not yet in the endpoints) with
    the SDK's channel and retry policy, as deploy/README tells clients to."""
    baked, _ = images
    a = run_container(baked).wait_serving()
    b = run_container(baked).wait_serving()
    c_port, d_port = free_port(), free_port()
    slots = ",".join(f"127.0.0.1:{p}" for p in (a.port, b.port, c_port, d_port))
    with Load(f"ipv4:{slots}", callers=4, count=64, retries=True) as load:
        load.wait_calls(20)
        c = run_container(baked, port=c_port).wait_serving()
        assert a.stop()[0] == 0
        d = run_container(baked, port=d_port).wait_serving()
        assert b.stop()[0] == 0
        # The load goes on over C and D until both have answered calls (or the deadline).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            r.metric("vae_requests_total", method="Sample", code="OK") > 0 for r in (c, d)
        ):
            time.sleep(0.2)
    assert set(load.codes) == {"OK"}, load.codes
    for replacement in (c, d):
        assert replacement.metric("vae_requests_total", method="Sample", code="OK") > 0
    figures["rolling_update"] = {"calls": dict(load.codes)}


def test_kube_play_of_the_cpu_overlay_serves_and_stops_cleanly(
    images: tuple[str, str], tmp_path: Path
) -> None:
    """The rendered CPU overlay through `podman kube play`. It honours the ConfigMap, the
    downward API, the security context, resources and the emptyDir; it ignores the Namespace,
    Services, HPA, PDB, NetworkPolicy, probes, preStop and terminationGracePeriodSeconds (see
    deploy/README.md): this is the pod as a container engine runs it, not a cluster."""
    baked, _ = images
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: the overlay cannot be rendered on this machine")
    rendered = subprocess.run(
        [kubectl, "kustomize", "deploy/k8s/overlays/cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"image: {baked}" in rendered, f"the overlay does not run {baked}"
    manifest = tmp_path / "cpu.yaml"
    manifest.write_text(rendered)
    played = podman("kube", "play", str(manifest), timeout=180)
    try:
        pods = [line.split()[0] for line in played.stdout.split("Pod:\n")[1:]]
        assert pods, played.stdout
        server = Container("", 50051, 8000, time.monotonic())
        names = podman("ps", "--filter", f"pod={pods[0]}", "--format", "{{.Names}}").stdout
        (server.name,) = [n for n in names.split() if not n.endswith("-infra")]
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        exercise(server)
        json_log_records(server)
        podman("pod", "stop", "-t", "40", pods[0], timeout=90)
        assert server.state()["ExitCode"] == 0
    finally:
        podman("kube", "down", str(manifest), check=False)


def test_the_image_runs_the_server_and_its_training_scripts_say_what_they_need(
    images: tuple[str, str],
) -> None:
    baked, _ = images
    result = podman("run", "--rm", "--entrypoint", "vae-serve", baked, "--help", check=False)
    assert result.returncode == 0, f"vae-serve: {result.stderr}"
    # The server image carries no client (neither its package nor its console scripts), and
    # no installer: pip and setuptools are build tools.
    for command in ("vae-client", "vae-loadtest"):
        result = podman("run", "--rm", "--entrypoint", command, baked, "--help", check=False)
        assert result.returncode != 0, f"{command} is in the server image"
    absent = ("vae_client", "hdrhistogram", "pip", "setuptools", "pkg_resources")
    code = f"import importlib.util as u; print(*(u.find_spec(m) for m in {absent!r}))"
    result = podman("run", "--rm", "--entrypoint", "python", baked, "-c", code, check=False)
    assert result.stdout.split() == ["None"] * len(absent), result.stdout + result.stderr
    for command in ("vae-train", "vae-evaluate", "vae-export"):
        result = podman("run", "--rm", "--entrypoint", command, baked, "--help", check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [
            line for line in result.stderr.strip().splitlines() if "training extra" in line
        ], result.stderr
