"""The default model's recorded figures (README "Model quality"), kept beside the other results:
`make model` writes them into the version's manifest, which lives under models/ (not in git);
this copies them to bench/results/default_model.json, with the machine they were made on.

    make model && .venv/bin/python -m bench.default_model   # the newest models/mnist-vae version
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.machine import cpu

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "default_model.json"


def figures(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": "make model",
        "model": f"{manifest['name']}/{manifest['version']}",
        "created_at": manifest["created_at"],
        "git_commit": manifest["git_commit"],
        "cpu": cpu(),
        "training": {k: v for k, v in manifest["training"].items() if k != "data"},
        "data": manifest["training"]["data"] | {"path": None},
        "metrics": manifest["metrics"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "mnist-vae")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    versions = sorted(
        (p for p in args.model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    manifest = json.loads((versions[-1] / "manifest.json").read_text())
    args.out.write_text(json.dumps(figures(manifest), indent=2) + "\n")
    print(f"wrote {args.out} from {versions[-1]}")


if __name__ == "__main__":
    main()
