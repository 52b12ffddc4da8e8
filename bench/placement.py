"""Where a benchmarked server runs: a free port, its cores (`taskset`, and this process pinned
away from them), the `vae-serve` command and the flags serving one model version."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A port free right now on loopback (the kernel's pick; a tiny race is fine for benches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether `port` on loopback is free (a peer's fixed port: is an earlier one still up?)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cpu_list(spec: str) -> list[int]:
    """taskset's list syntax: "1", "0-1", "0,2-3"."""
    cpus: list[int] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cpus += range(int(low), int(high or low) + 1)
    return cpus


def pin_self(cpus: str) -> None:
    """Run this process (the load generator) on `cpus` only, away from the servers' cores."""
    os.sched_setaffinity(0, set(cpu_list(cpus)))


def pinned(cpus: str | None, command: list[str]) -> list[str]:
    """`command` under `taskset -c cpus` (taskset execs it: the pid stays the same)."""
    return ["taskset", "-c", cpus, *command] if cpus else command


def vae_serve_command() -> list[str]:
    """The installed console script (`-m service` if it is not installed)."""
    script = Path(sys.executable).with_name("vae-serve")
    if script.exists():
        return [str(script)]
    found = shutil.which("vae-serve")
    return [found] if found else [sys.executable, "-m", "service"]


def model_flags(version_dir: Path) -> list[str]:
    """`vae-serve` flags serving `<repo>/<name>/<version>/` on the CPU provider."""
    return [
        "--model-repo", str(version_dir.parent.parent),
        "--model-name", version_dir.parent.name,
        "--model-version", version_dir.name,
        "--provider", "cpu",
    ]  # fmt: skip
