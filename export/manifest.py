"""The manifest: the contract between the export stage and the service.

A version folder of the model repository (`<repo>/<model-name>/<version>/`, export/repository.py)
holds `encoder.onnx`, `decoder.onnx` and `manifest.json`. The service trusts a version only
after `open_version` has checked it: the folder and every file it reads lie inside the repository
(symbolic links included) and are regular files, the manifest names this model and version, and
every ONNX file matches the sha256 recorded here and keeps no weights in external files. Each
refusal is a one-line reason. This module imports neither torch nor onnx, so the serving image
can use it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from export.onnx_wire import WireError, external_tensors

# The repository's folders and its error, re-exported: the service imports them from here.
from export.repository import MAX_VERSION as MAX_VERSION
from export.repository import ModelError as ModelError
from export.repository import list_versions as list_versions
from export.repository import read_inside, repository_root
from export.repository import resolve_version as resolve_version
from export.repository import version_number as version_number

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
MAX_NETWORK_BYTES = 1 << 30  # the default model's files are 1-2 MB; protobuf's limit is 2 GiB


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


class Variant(BaseModel):
    """The same networks at another precision (`int8`, `fp16`): their files, how they were made
    and what the quality gate measured against fp32 (export/precision.py)."""

    encoder: NetworkFile
    decoder: NetworkFile
    recipe: dict[str, Any] = {}
    quality: dict[str, float] = {}


FP32 = "fp32"  # the precision of the manifest's own encoder and decoder
# The decoder's optional second output: its images as uint8 (export/image_output.py writes it;
# a version without it has the server round in numpy instead).
IMAGE_OUTPUT = "image"


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    name: str
    version: int = Field(ge=1, le=MAX_VERSION)
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
    variants: dict[str, Variant] = {}  # other precisions of the same networks, by name

    def precisions(self) -> list[str]:
        return [FP32, *sorted(self.variants)]

    def networks(self, precision: str = FP32) -> dict[str, NetworkFile]:
        if precision == FP32:
            return {"encoder": self.encoder, "decoder": self.decoder}
        variant = self.variants.get(precision)
        if variant is None:
            raise ModelError(
                f"{self.name} version {self.version} has no {precision} variant (it has "
                f"{', '.join(self.precisions())}); export it with vae-export, or serve another "
                "precision"
            )
        return {"encoder": variant.encoder, "decoder": variant.decoder}

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


# Verifying a version: its manifest and every file it names


def _one_line(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in error.errors()
    )


def _read_manifest(directory: Path, root: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    if not path.exists():
        raise ModelError(f"{path}: no manifest (is this a version exported by vae-export?)")
    data = read_inside(path, root, "manifest", MAX_MANIFEST_BYTES)
    try:
        return Manifest.model_validate(json.loads(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not a valid manifest: not JSON ({e})") from e
    except ValidationError as e:
        raise ModelError(f"{path}: not a valid manifest: {_one_line(e)}") from e


def _check_signatures(directory: Path, manifest: Manifest, precision: str) -> None:
    latent = manifest.latent_size
    pixels = 1
    for side in manifest.image_shape:
        pixels *= side
    expected = {
        "encoder": (["N", pixels], ["N", latent]),
        "decoder": (["N", latent], ["N", pixels]),
    }
    for role, net in manifest.networks(precision).items():
        in_shape, out_shape = expected[role]
        if [t.shape for t in net.inputs] != [in_shape] or any(
            t.shape != out_shape for t in net.outputs
        ):
            raise ModelError(
                f"{directory / MANIFEST_FILE}: the {role} signature does not fit latent_size="
                f"{latent} and image_shape={manifest.image_shape}"
            )


def _read_network(
    directory: Path,
    root: Path,
    role: str,
    net: NetworkFile,
    malformed: dict[str, str] | None = None,
) -> bytes:
    """One ONNX file of the version, verified: a plain file name in the version folder, inside
    the repository, a regular file, its sha256 the manifest's, no tensor in external files.
    Bytes that are not a protobuf message raise, or with `malformed` are noted there by role
    (the caller lets ONNX Runtime say why it cannot load them)."""
    name = net.path
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or Path(name).name != name:
        raise ModelError(
            f"{directory / MANIFEST_FILE}: {role}.path {name!a} is not a plain file name "
            "inside the version folder; refused"
        )
    path = directory / name
    data = read_inside(path, root, f"{role} file named in the manifest", MAX_NETWORK_BYTES)
    actual = hashlib.sha256(data).hexdigest()
    if actual != net.sha256:
        raise ModelError(
            f"{path}: sha256 {actual} does not match the manifest's {net.sha256} "
            "(the file was changed or corrupted after export)"
        )
    try:
        external = external_tensors(data)
    except WireError as e:
        if malformed is None:
            raise ModelError(f"{path}: not an ONNX file ({e})") from e
        malformed[role] = f"{path}: not a well-formed ONNX file ({e})"
        return data
    if external:
        raise ModelError(
            f"{path}: {len(external)} tensor(s) ({', '.join(external[:3])}) are kept in external "
            "data files, outside the manifest's sha256; export the graph as one file"
        )
    return data


@dataclass(frozen=True)
class VerifiedVersion:
    """A version whose manifest and files passed every check; `networks` holds the bytes that
    were checksummed (give these to ONNX Runtime, not the paths: no file can change between
    the check and the load). `malformed`: the networks whose bytes are not a protobuf message
    (so not checked for external data), with the reason: refuse them, after ONNX Runtime has
    said why it cannot load them."""

    directory: Path
    manifest: Manifest
    networks: dict[str, bytes]
    malformed: dict[str, str]


def open_version(directory: Path, precision: str = FP32) -> VerifiedVersion:
    """Read and verify one `<repo>/<name>/<version>` folder: its name is a version number, it
    and every file lie inside the repository, the manifest names this model and version, and
    the ONNX files of `precision` match their sha256. Raises ModelError with a one-line
    reason."""
    root = repository_root(directory)
    version = version_number(directory.name)
    if version is None:
        raise ModelError(
            f"{directory}: not a version folder name (a number from 1 to {MAX_VERSION})"
        )
    try:
        real = directory.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise ModelError(f"{directory}: cannot resolve the version folder: {e}") from e
    if not real.is_relative_to(root) or not real.is_dir():
        raise ModelError(
            f"{directory}: the version folder lies outside the model repository {root}, or is "
            "not a folder; refused"
        )
    manifest = _read_manifest(directory, root)
    if manifest.version != version:
        raise ModelError(
            f"{directory}: the directory says version {version}, "
            f"the manifest says {manifest.version}"
        )
    if manifest.name != directory.parent.name:
        raise ModelError(
            f"{directory}: the manifest names model {manifest.name!a}, the folder "
            f"{directory.parent.name!a}"
        )
    _check_signatures(directory, manifest, precision)
    malformed: dict[str, str] = {}
    networks = {
        role: _read_network(directory, root, role, net, malformed)
        for role, net in manifest.networks(precision).items()
    }
    return VerifiedVersion(directory, manifest, networks, malformed)


def load_verified(directory: Path) -> Manifest:
    """Read the manifest of one version directory and verify its files, those of every
    precision variant included, against it."""
    manifest = open_version(directory).manifest
    for precision in manifest.precisions():
        for reason in open_version(directory, precision).malformed.values():
            raise ModelError(reason)
    return manifest
