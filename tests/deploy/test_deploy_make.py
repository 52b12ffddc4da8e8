"""The Makefile's deployment targets: `image` and `image-gpu` fail clearly without a container
engine, build the tags the overlays deploy, and `manifests` / `deploy` use the overlays."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE_TAGS = {"image": VERSION, "image-gpu": f"{VERSION}-gpu"}
OVERLAY_OF = {"image": "cpu", "image-gpu": "gpu"}


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("target", sorted(IMAGE_TAGS))
def test_image_without_an_engine_fails_at_once_and_says_why(target: str) -> None:
    result = make(target, "CONTAINER_ENGINE=no-such-container-engine")
    assert result.returncode != 0
    assert "no container engine is running" in result.stderr
    assert "vae-train" not in result.stdout, "it should fail before training a model"


@pytest.mark.parametrize("target", sorted(IMAGE_TAGS))
def test_image_builds_the_tag_of_its_overlay(target: str) -> None:
    """`make image` tags vae-serve:<version>, `make image-gpu` <version>-gpu; each overlay runs
    that image, of the same flavour (the tag itself moves with each rollout)."""
    result = make("-n", target, "CONTAINER_ENGINE=true")
    assert result.returncode == 0, result.stderr
    assert f"-t vae-serve:{IMAGE_TAGS[target]} ." in result.stdout
    kustomization = REPO / "deploy/k8s/overlays" / OVERLAY_OF[target] / "kustomization.yaml"
    (image,) = yaml.safe_load(kustomization.read_text())["images"]
    assert image["newName"].rpartition("/")[2] == "vae-serve"
    assert image["newTag"].endswith("-gpu") == (target == "image-gpu")


def test_a_mounted_model_image_needs_no_model() -> None:
    result = make("-n", "image", "CONTAINER_ENGINE=true", "MODEL_SOURCE=mounted")
    assert result.returncode == 0, result.stderr
    assert "--build-arg MODEL_SOURCE=mounted" in result.stdout
    assert "vae-train" not in result.stdout and " model\n" not in result.stdout


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_deploy_applies_the_overlay_and_waits(overlay: str) -> None:
    result = make("-n", "deploy", f"OVERLAY={overlay}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"kubectl apply -k deploy/k8s/overlays/{overlay}"
    assert lines[1].startswith("kubectl --namespace vae-serve rollout status deployment/vae-serve")


def test_manifests_renders_every_overlay(kubectl: str, tmp_path: Path) -> None:
    result = make("manifests", f"MANIFESTS_DIR={tmp_path}", f"KUBECTL={kubectl}")
    assert result.returncode == 0, result.stderr
    for overlay in ("cpu", "gpu"):
        expected = subprocess.run(
            [kubectl, "kustomize", f"deploy/k8s/overlays/{overlay}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert (tmp_path / f"{overlay}.yaml").read_text() == expected
