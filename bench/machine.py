"""The machine a figure was measured on, for every results file: the CPU's model name, its
vector instruction sets (AVX, AVX-512, VNNI, AMX: what ONNX Runtime's kernels and int8 speed
depend on), the CPUs and Python."""

from __future__ import annotations

import os
import platform
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
