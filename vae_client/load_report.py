"""What `vae-loadtest` prints: one run's report (throughput, HDR latency percentiles, errors by
status code, the generator's own CPU) as text or JSON, and a sweep's throughput-latency plot."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass
class Report:
    config: dict[str, Any]
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    requests_per_s: float = 0.0
    images_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    client_cpu_percent: float = 0.0  # the generator's own CPU over the run: near 100 = saturated
    send_lag_ms_max: float = 0.0  # open loop: worst delay of a send behind its schedule
    max_in_flight: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return self.ok + sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, **asdict(self)}


def format_report(report: Report) -> str:
    c = report.config
    load = (
        f"concurrency {c['concurrency']}"
        if c["mode"] == "closed"
        else (f"rate {c['rate']:g}/s ({c['arrivals']})")
    )
    lines = [
        f"{c['method']} count={c['count']} format={c['image_format']}  {load}  "
        f"connections={max(c['connections'], len(c['targets']))}",
        f"  requests: {report.ok} ok, {sum(report.errors.values())} failed in "
        f"{report.elapsed_s:.2f} s",
        f"  throughput: {report.requests_per_s:,.0f} requests/s, "
        f"{report.images_per_s:,.0f} images/s",
    ]
    if report.latency_ms:
        lat = "  ".join(f"{k} {v:.3f}" for k, v in report.latency_ms.items())
        lines.append(f"  latency ms: {lat}")
    for code, n in sorted(report.errors.items()):
        lines.append(f"  error {code}: {n} ({report.error_examples.get(code, '')})")
    lines.append(f"  client CPU: {report.client_cpu_percent:.0f}% of one core")
    if c["mode"] == "open":
        lines.append(
            f"  open loop: max {report.max_in_flight} in flight, "
            f"sends up to {report.send_lag_ms_max:.1f} ms behind schedule"
        )
    lines.extend(f"  note: {note}" for note in report.notes)
    return "\n".join(lines)


def plot_sweep(reports: list[Report], path: str) -> None:
    """Throughput against p99 latency, one point per sweep step, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = reports[0].config
    images = c["method"] != "info" and c["count"] > 1
    xs = [r.images_per_s if images else r.requests_per_s for r in reports]
    ys = [r.latency_ms.get("p99", math.nan) for r in reports]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, ys, marker="o")
    key = "concurrency" if c["mode"] == "closed" else "rate"
    for r, x, y in zip(reports, xs, ys, strict=True):
        ax.annotate(f"{r.config[key]:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("images/s" if images else "requests/s")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(
        f"{c['method']} count={c['count']} {c['image_format']}: {c['mode']} loop, "
        f"points labelled by {key}"
    )
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
