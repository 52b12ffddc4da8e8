"""Fixtures for the deployment checks: where things are, and the manifests as kubectl renders
them (rendered once per session; skipped, with the reason, where kubectl is missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
COMPONENTS = ("servicemonitor", "model-pvc")

Manifest = dict[str, Any]
Render = Callable[[Path], list[Manifest]]


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not on PATH: the manifests cannot be rendered on this machine")
    return path


@pytest.fixture(scope="session")
def render(kubectl: str) -> Render:
    """`kubectl kustomize <directory>`, parsed into a list of objects."""

    def run(directory: Path) -> list[Manifest]:
        result = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return run


@pytest.fixture(scope="session")
def overlay_with_components(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """A kustomization in a temporary directory that adds `components` to an overlay, as an
    operator does by uncommenting them (kustomize takes only relative paths)."""

    def make(overlay: str, *components: str) -> Path:
        directory = tmp_path_factory.mktemp(f"{overlay}-{'-'.join(components)}")
        relative = Path(os.path.relpath(K8S, directory))
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": "vae-serve",
            "resources": [str(relative / "overlays" / overlay)],
            "components": [str(relative / "components" / c) for c in components],
        }
        (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return directory

    return make


# What an operator can deploy: each overlay, and the CPU overlay with every optional component.
VARIANTS = (*OVERLAYS, "cpu+components")


@pytest.fixture(scope="session")
def rendered(
    render: Render, overlay_with_components: Callable[..., Path]
) -> dict[str, list[Manifest]]:
    """Every variant as rendered by kubectl, by name."""
    variants = {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}
    variants["cpu+components"] = render(overlay_with_components("cpu", *COMPONENTS))
    return variants


@pytest.fixture(params=VARIANTS)
def objects(request: pytest.FixtureRequest, rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    """The rendered objects of one variant (the tests using it run once per variant)."""
    return rendered[request.param]
