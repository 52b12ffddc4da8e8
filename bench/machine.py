"""The machine and the code a figure was measured on, for every results file: the CPU's model
name, its vector instruction sets (AVX, AVX-512, VNNI, AMX: what ONNX Runtime's kernels and int8
speed depend on), the CPUs and Python; the load average (the machine is shared); the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def cpu() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = text.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {
        "model_name": model,
        "avx_flags": sorted(f for f in flags if f.startswith(("avx", "amx"))),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def load_now() -> dict[str, Any]:
    """The CPUs and the load average now: was anything else running?"""
    return {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def git_commit() -> str | None:
    """The short commit of the checkout the figures come from (None outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return out.stdout.strip() or None
