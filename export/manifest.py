"""The manifest: the contract between the export stage and the service.

A model repository is laid out as `<repo>/<model-name>/<version>/` (versions are positive
integers, as in Triton and TF Serving) holding `encoder.onnx`, `decoder.onnx` and
`manifest.json`. The service trusts a version only after `verify_files` has matched every ONNX
file against the sha256 recorded here. This module imports neither torch nor onnx, so the
serving image can use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class ModelError(Exception):
    """A model version that is missing, tampered with or inconsistent."""


class TensorSpec(BaseModel):
    name: str
    dtype: str
    shape: list[int | str]  # "N" marks the dynamic batch axis


class NetworkFile(BaseModel):
    """One ONNX file of a version: where it is, its checksum and its signature."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    name: str
    version: int = Field(ge=1)
    latent_size: int = Field(ge=1)
    image_shape: list[int]
    opset: int
    encoder: NetworkFile
    decoder: NetworkFile
    config: dict[str, Any] = {}  # the VAEConfig the networks were built from
    parity: dict[str, float] = {}  # max |PyTorch - ONNX Runtime| per network
    parity_check: dict[str, Any] = {}  # how parity was checked: tolerance, batch sizes, inputs
    training: dict[str, Any] = {}  # data, settings and timings of the training run
    metrics: dict[str, float] = {}  # test-set figures, e.g. negative_elbo, iw_nll
    created_at: str = ""
    git_commit: str = ""

    def networks(self) -> dict[str, NetworkFile]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ModelError(f"{path}: no manifest (is this a version exported by vae-export?)")
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as e:
        raise ModelError(f"{path}: not a valid manifest: {e}") from e


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Raise ModelError unless every ONNX file exists and matches its recorded sha256."""
    latent = manifest.latent_size
    pixels = 1
    for side in manifest.image_shape:
        pixels *= side
    expected = {
        "encoder": (["N", pixels], ["N", latent]),
        "decoder": (["N", latent], ["N", pixels]),
    }
    for role, net in manifest.networks().items():
        path = directory / net.path
        if not path.is_file():
            raise ModelError(f"{path}: the {role} file named in the manifest is missing")
        actual = sha256_of(path)
        if actual != net.sha256:
            raise ModelError(
                f"{path}: sha256 {actual} does not match the manifest's {net.sha256} "
                "(the file was changed or corrupted after export)"
            )
        in_shape, out_shape = expected[role]
        if [t.shape for t in net.inputs] != [in_shape] or any(
            t.shape != out_shape for t in net.outputs
        ):
            raise ModelError(
                f"{directory / MANIFEST_FILE}: the {role} signature does not fit latent_size="
                f"{latent} and image_shape={manifest.image_shape}"
            )


def list_versions(model_dir: Path) -> list[int]:
    """The version numbers under `<repo>/<model-name>/`, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_version(repo: Path, name: str, version: int | None = None) -> Path:
    """The directory of `version` (the latest if None), or ModelError saying what is missing."""
    model_dir = repo / name
    versions = list_versions(model_dir)
    if not versions:
        raise ModelError(
            f"{model_dir}: no model versions found (expected <repo>/<model>/<version>/; "
            "run `make model` to train and export the default one)"
        )
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise ModelError(f"{model_dir}: version {chosen} not found (have {versions})")
    return model_dir / str(chosen)


def load_verified(directory: Path) -> Manifest:
    """Read the manifest of one version directory and verify its files against it."""
    manifest = read_manifest(directory)
    if directory.name.isdigit() and int(directory.name) != manifest.version:
        raise ModelError(
            f"{directory}: the directory says version {directory.name}, "
            f"the manifest says {manifest.version}"
        )
    verify_files(directory, manifest)
    return manifest
