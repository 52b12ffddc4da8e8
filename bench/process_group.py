"""Servers that run as a process group of their own (Triton through PyTriton is three kinds of
process): started pinned to their cores with their output in a log file, measured over the whole
process tree (memory, CPU time), stopped with SIGTERM, then SIGKILL to whatever of the group is
left after a timeout. The peers' launcher
(bench/peers/run_peers.py, bench/v2_triton.py); `vae-serve` (one process, or a supervisor and its
workers, whose children it counts): bench.servers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path

from bench.placement import pinned

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def spawn_group(command: list[str], cpus: str, log: Path) -> subprocess.Popen[bytes]:
    """`command` on `cpus`, leader of a new session (so of a new process group)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            pinned(cpus, command), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the leader, wait for the whole group to exit, SIGKILL what remains."""
    group = proc.pid  # start_new_session: the group id is the leader's pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and group_alive(group):
        proc.poll()  # reap the leader when it exits
        time.sleep(0.1)
    if group_alive(group):
        os.killpg(group, signal.SIGKILL)
    proc.wait(timeout=10)


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def tree(root: int) -> list[int]:
    """`root` and all its descendants still alive."""
    pids, i = [root], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            with suppress(OSError):
                pids += [int(p) for p in (task / "children").read_text().split()]
        i += 1
    return pids


def rss_mb(root: int) -> float:
    """Resident memory of the whole tree (VmRSS summed; shared pages count once per process)."""
    total_kb = 0
    for pid in tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if match := re.search(r"^VmRSS:\s+(\d+) kB", status, re.M):
            total_kb += int(match.group(1))
    return total_kb / 1024


def cpu_seconds(root: int) -> float:
    """User + system CPU of the tree so far."""
    ticks = 0
    for pid in tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS
