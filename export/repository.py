"""The model repository on disk: `<repo>/<model-name>/<version>/`, versions named by positive
integers (as in Triton and TF Serving) in canonical ASCII decimal, and reading a file of it
without leaving it.

What a version folder must hold, and the checks that make the service trust it, are
`export/manifest.py`; this module knows only the folders and how to read one file safely. It
imports neither torch nor onnx, so the serving image can use it.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

log = logging.getLogger(__name__)

VERSION_NAME = re.compile(r"[1-9][0-9]*", re.ASCII)  # [0-9]: ASCII digits only, unlike \d
MAX_VERSION = 2**63 - 1  # ModelInfo.version is an int64


class ModelError(Exception):
    """A model version that is missing, tampered with or inconsistent."""


# Version folders


def version_number(name: str) -> int | None:
    """The version a folder name stands for, or None: only canonical ASCII decimals 1 to
    2^63 - 1 (a protobuf int64) without leading zeros count, so each version has exactly one
    folder ("02", "٣" and "²" name none)."""
    if not VERSION_NAME.fullmatch(name):
        return None
    version = int(name)
    return version if version <= MAX_VERSION else None


_ignored_reported: set[Path] = set()


def list_versions(model_dir: Path) -> list[int]:
    """The version numbers under `<repo>/<model-name>/`, ascending. Other entries are ignored:
    hidden ones (an export's staging folder) silently, the rest with one warning each per
    process."""
    if not model_dir.is_dir():
        return []
    versions = []
    for entry in model_dir.iterdir():
        version = version_number(entry.name)
        if version is not None and entry.is_dir():
            versions.append(version)
        elif not entry.name.startswith(".") and entry not in _ignored_reported:
            _ignored_reported.add(entry)
            log.warning(
                "ignoring %a: not a version folder (expected a folder named by a number from 1 "
                "to %d, without leading zeros)",
                str(entry),
                MAX_VERSION,
            )
    return sorted(versions)


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


# Reading inside the repository


def repository_root(version_dir: Path) -> Path:
    """The resolved repository that `<repo>/<model-name>/<version>` lies in."""
    try:
        return version_dir.parent.parent.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise ModelError(f"{version_dir}: cannot resolve its model repository: {e}") from e


def read_inside(path: Path, root: Path, what: str, limit: int) -> bytes:
    """The bytes of `path`, a regular file whose real path lies inside `root` (the resolved
    repository), at most `limit` bytes; else ModelError with a one-line reason. Opened without
    following a last symbolic link and without blocking (a FIFO), so what is checked is what
    is read."""
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: the {what} is missing") from None
    except (OSError, RuntimeError) as e:  # RuntimeError: a symbolic link loop
        raise ModelError(f"{path}: cannot resolve the {what}: {e}") from e
    if not real.is_relative_to(root):
        raise ModelError(f"{path}: the {what} lies outside the model repository {root}; refused")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise ModelError(f"{path}: cannot open the {what}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(f.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise ModelError(f"{path}: the {what} is not a regular file; refused")
        if status.st_size > limit:
            raise ModelError(
                f"{path}: the {what} has {status.st_size} bytes, above the limit of {limit}"
            )
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ModelError(f"{path}: the {what} grew above the limit of {limit} bytes")
    return data
