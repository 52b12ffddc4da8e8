"""The real container image under podman: run by `make image-test`, which builds the images
first and names them in VAE_TEST_IMAGE (model baked in) and VAE_TEST_IMAGE_NOMODEL (a mount
point at /models); skipped, with that reason, in a plain `pytest` run."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.image.container import REPO, STOP_TIMEOUT, Container, podman


@pytest.fixture(scope="session")
def images() -> tuple[str, str]:
    baked, mounted = os.environ.get("VAE_TEST_IMAGE"), os.environ.get("VAE_TEST_IMAGE_NOMODEL")
    if not baked or not mounted:
        pytest.skip("the container image tests run through `make image-test`, which builds them")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: `make image-test` installs it")
    return baked, mounted


@pytest.fixture(scope="session")
def model_repo() -> Path:
    """The repository `make model` exported (vae-export's own files, modes untouched)."""
    return (REPO / os.environ.get("VAE_TEST_MODEL_REPO", "models")).resolve()


@pytest.fixture
def run_container(images: tuple[str, str]) -> Iterator[object]:
    """`run_container(image, *podman_run_flags, port=0)` -> a started Container (not waited on);
    every container is removed at teardown."""
    names: list[str] = []

    def run(image: str, *flags: str, port: int = 0) -> Container:
        name = f"vae-image-test-{os.getpid()}-{len(names)}"
        names.append(name)
        started = time.monotonic()
        podman(
            "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
            "--stop-timeout", str(STOP_TIMEOUT),
            "-p", f"127.0.0.1:{port or ''}:50051", "-p", "127.0.0.1::8000",
            *flags, image,
        )  # fmt: skip
        ports = {}
        for inside in (50051, 8000):
            mapping = podman("port", name, f"{inside}/tcp").stdout.strip().splitlines()[0]
            ports[inside] = int(mapping.rpartition(":")[2])
        return Container(name, ports[50051], ports[8000], started)

    yield run
    for name in names:
        podman("rm", "--force", "--time", "1", name, check=False)


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """What the tests measured, written to bench/results/image.json (quoted in
    deploy/README.md) once the whole run has passed."""
    found: dict[str, Any] = {}
    yield found
    if found and request.session.testsfailed == 0:
        out = REPO / "bench" / "results" / "image.json"
        out.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
