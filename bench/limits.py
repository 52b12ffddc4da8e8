"""The limit for `make bench`: `bench.inprocess` run as a child pinned to the server's cores
(its own, quiet, process), and the best of two passes (a shared machine may have been busy the
first time)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any


def limit(args: argparse.Namespace, env: dict[str, str], *flags: str) -> dict[str, Any]:
    """bench.inprocess pinned to the server's cores, as a child (its own, quiet, process)."""
    command = [
        "taskset", "-c", args.server_cpus, sys.executable, "-m", "bench.inprocess",
        str(args.version_dir), "--duration", str(args.duration), "--json", *flags,
    ]  # fmt: skip
    print(f"in process on cpus {args.server_cpus} ...", flush=True)
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"bench.inprocess failed: {run.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(run.stdout)
    for kind in ("onnxruntime", "pipeline", "servicer", "torch"):
        for p in result.get(kind, {}).get("points", []):
            print(f"  {kind:12} batch {p['batch']:5}: {p['images_per_s']:12,.0f} images/s")
    return result


def keep_best(first: dict[str, Any], again: dict[str, Any]) -> None:
    """Each batch size's best of the two in-process passes (both kept, as `passes`)."""
    for p, q in zip(first["points"], again["onnxruntime"]["points"], strict=True):
        p["passes"] = [p["images_per_s"], q["images_per_s"]]
        if q["images_per_s"] > p["images_per_s"]:
            p.update(images_per_s=q["images_per_s"], us_per_call=q["us_per_call"])
