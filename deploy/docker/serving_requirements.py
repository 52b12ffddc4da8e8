"""Print the serving requirements of pyproject.toml with ONNX Runtime pinned to one wheel.

pyproject.toml lists `onnxruntime-gpu` among the base dependencies. An image build installs the
package itself with `--no-deps` and its dependencies from this list instead, so that

- the CPU image gets `onnxruntime` (the CPU-only wheel, a fraction of the size) and
- both images get the exact ONNX Runtime version the Dockerfile pins (the GPU base image's CUDA
  major version must match the one that wheel was built against).

Usage: python serving_requirements.py PYPROJECT ONNXRUNTIME_REQUIREMENT
       e.g. python serving_requirements.py pyproject.toml onnxruntime==1.31.1
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ONNXRUNTIME_PACKAGES = {"onnxruntime", "onnxruntime-gpu"}


def package_name(requirement: str) -> str:
    """The normalised distribution name at the start of a PEP 508 requirement."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def serving_requirements(pyproject: Path, onnxruntime: str) -> list[str]:
    """The base dependencies of `pyproject`, any ONNX Runtime wheel replaced by `onnxruntime`."""
    if package_name(onnxruntime) not in ONNXRUNTIME_PACKAGES:
        raise ValueError(f"expected an onnxruntime or onnxruntime-gpu requirement: {onnxruntime!r}")
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    kept = [dep for dep in dependencies if package_name(dep) not in ONNXRUNTIME_PACKAGES]
    if len(kept) == len(dependencies):
        raise ValueError(f"{pyproject} lists no ONNX Runtime dependency to replace")
    return [*kept, onnxruntime]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(serving_requirements(Path(argv[1]), argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
