"""The goals of issue 4 as ratios between figures of one `make bench` run (bench.json).

Every ratio divides two figures of the same run, except the peers': theirs come from their own
run (`make bench-peers`, bench/results/peers.json), whose date the report quotes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PEER_LOADS = ((64, 32), (1, 32))  # (count, concurrency) compared with the peers, uint8
BATCHING_TOLERANCE = 0.95  # "never slower": on >= 0.95 x off, the noise of one point here


def load_peers(path: Path) -> dict[str, Any]:
    """The peers' figures from `make bench-peers`, or why there are none."""
    if not path.is_file():
        return {"missing": f"{path.name} not found: run `make bench-peers`"}
    data = json.loads(path.read_text())
    peers = {}
    for name, peer in data.get("peers", {}).items():
        if "error" in peer:
            peers[name] = {"error": peer["error"]}
            continue
        peers[name] = {
            "package": peer.get("package"),
            "rss_mb_idle": peer.get("rss_mb_idle"),
            "points": [
                {
                    "count": p["count"],
                    "concurrency": p["concurrency"],
                    "requests_per_s": p["requests_per_s"],
                    "images_per_s": p["images_per_s"],
                    "p99_ms": p["latency_ms"].get("p99"),
                    "loadavg_1m": p.get("loadavg_1m"),
                }
                for p in peer.get("points", [])
            ],
        }
    return {
        "source": str(path.name),
        "generated_at": data.get("generated_at"),
        "duration_s": data.get("duration_s"),
        "server_cpus": data.get("server_cpus"),
        "peers": peers,
    }


# -- finding figures ----------------------------------------------------------------------------


def point(
    results: dict[str, Any],
    server: str,
    method: str,
    count: int,
    image_format: str,
    concurrency: int,
    section: str | None = None,
) -> dict[str, Any] | None:
    """The point measured with these settings; of repeated ones (batching), the best."""
    key = (server, method, count, image_format, concurrency)
    matches = [
        p
        for p in results.get("points", [])
        if (p["server"], p["method"], p["count"], p["image_format"], p["concurrency"]) == key
        and p.get("section") == section
    ]
    return max(matches, key=lambda p: p["images_per_s"], default=None)


def best(results: dict[str, Any], count: int, image_format: str) -> dict[str, Any] | None:
    """The service's Sample point with the most images/s over the concurrencies."""
    candidates = [
        p
        for p in results.get("points", [])
        if p["server"] == "service"
        and p["method"] == "sample"
        and p["count"] == count
        and p["image_format"] == image_format
        and p.get("section") is None
    ]
    return max(candidates, key=lambda p: p["images_per_s"], default=None)


def limit_rate(
    results: dict[str, Any], batch: int, kind: str = "onnxruntime", limit: str = ""
) -> float | None:
    """The in-process images/s at `batch`; `limit`: another precision's (e.g. `limit_int8`)."""
    for p in results.get(limit or "limit", {}).get(kind, {}).get("points", []):
        if p["batch"] == batch:
            return float(p["images_per_s"])
    return None


def precision_served(results: dict[str, Any], server: str, count: int) -> dict[str, Any] | None:
    """`server`'s Sample(count, uint8) point of the precision section with the most images/s."""
    candidates = [
        p
        for p in results.get("points", [])
        if p.get("section") == "precision" and p["server"] == server and p["count"] == count
    ]
    return max(candidates, key=lambda p: p["images_per_s"], default=None)


def p99(p: dict[str, Any] | None) -> float:
    return float(p["latency_ms"].get("p99", math.nan)) if p and p.get("latency_ms") else math.nan


# -- goals --------------------------------------------------------------------------------------


def _goal(name: str, measured: float | None, target: float, met: bool, detail: str) -> dict:
    return {"goal": name, "measured": measured, "target": target, "met": met, "detail": detail}


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for count, target in ((1024, 0.8), (64, 0.5)):
        ours, limit = best(results, count, "uint8"), limit_rate(results, count)
        ratio = ours["images_per_s"] / limit if ours and limit else None
        out.append(
            _goal(
                f"Sample({count}, uint8) / in-process ONNX Runtime (batch {count})",
                ratio,
                target,
                ratio is not None and ratio >= target,
                f"{number(figure(ours, 'images_per_s'))} images/s at concurrency "
                f"{figure(ours, 'concurrency') or '-'} vs {number(limit)} in process",
            )
        )
    ours = point(results, "service", "sample", 1, "uint8", 32)
    floor = point(results, "noop", "sample", 1, "uint8", 32)
    ratio = ours["requests_per_s"] / floor["requests_per_s"] if ours and floor else None
    out.append(
        _goal(
            "Sample(1) at concurrency 32 / no-op server's requests/s",
            ratio,
            0.9,
            ratio is not None and ratio >= 0.9,
            f"{number(figure(ours, 'requests_per_s'))} vs "
            f"{number(figure(floor, 'requests_per_s'))} requests/s",
        )
    )
    out += batching_goals(results)
    out += precision_goals(results)
    out += peer_goals(results)
    return out


def precision_goals(results: dict[str, Any], variant: str = "int8") -> list[dict[str, Any]]:
    """Issue 14: the int8 variant served against the fp32 decoder in process, and its memory."""
    server = results.get("servers", {}).get(variant)
    if server is None:
        return []
    out = []
    for count, target in ((1024, 1.2), (64, 0.8)):
        ours, limit = precision_served(results, variant, count), limit_rate(results, count)
        ratio = ours["images_per_s"] / limit if ours and limit else None
        out.append(
            _goal(
                f"Sample({count}, uint8), {variant} served / fp32 in-process ONNX Runtime "
                f"(batch {count})",
                ratio,
                target,
                ratio is not None and ratio >= target,
                f"{number(figure(ours, 'images_per_s'))} images/s at concurrency "
                f"{figure(ours, 'concurrency') or '-'} vs {number(limit)} in process",
            )
        )
    rss = server.get("rss_mb_end")
    out.append(
        _goal(
            f"RSS of the {variant} server at the end of the run, MB (at most)",
            rss,
            150,
            rss is not None and rss <= 150,
            "after every precision point, Sample(1024) included",
        )
    )
    return out


def batching_pairs(results: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(on, off) for each batching load, the best of its repeats each."""
    loads = []
    for p in results.get("points", []):
        key = (p["method"], p["count"], p["image_format"], p["concurrency"])
        if p.get("section") == "batching" and key not in loads:
            loads.append(key)
    pairs = []
    for key in loads:
        on = point(results, "service", *key, section="batching")
        off = point(results, "batching_off", *key, section="batching")
        if on and off:
            pairs.append((on, off))
    return pairs


def batching_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    pairs = batching_pairs(results)
    ratios = [on["images_per_s"] / max(off["images_per_s"], 1e-9) for on, off in pairs]
    worst = min(ratios, default=None)
    many = next((on for on, _ in pairs if (on["count"], on["concurrency"]) == (1, 64)), None)
    rows = many.get("rows_per_run") if many else None
    return [
        _goal(
            f"Batching on / off, images/s (worst of {len(ratios)} points; "
            f"within {1 - BATCHING_TOLERANCE:.0%} counts as not slower)",
            worst,
            1.0,
            worst is not None and worst >= BATCHING_TOLERANCE,
            ", ".join(
                f"{on['label']} x{on['concurrency']}: {ratio:.2f}"
                for (on, _), ratio in zip(pairs, ratios, strict=False)
            ),
        ),
        _goal(
            "Rows per run, 64 callers of one image, batching on",
            rows,
            1.0,
            rows is not None and rows > 1.0,
            "vae_images_generated_total / vae_batch_runs_total over the point",
        ),
    ]


def peer_point(peer: dict[str, Any], count: int, concurrency: int) -> dict[str, Any] | None:
    points = peer.get("points", [])
    return next((p for p in points if (p["count"], p["concurrency"]) == (count, concurrency)), None)


def peer_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    peers = results.get("peers", {}).get("peers", {})
    out = []
    for name, peer in peers.items():
        for count, concurrency in PEER_LOADS:
            theirs = peer_point(peer, count, concurrency)
            ours = point(results, "service", "sample", count, "uint8", concurrency)
            if theirs is None or ours is None:
                continue
            ratio = ours["images_per_s"] / theirs["images_per_s"]
            lower = p99(ours) < theirs["p99_ms"]
            out.append(
                _goal(
                    f"Sample({count}, uint8) x{concurrency} / {name}, with a lower p99",
                    ratio,
                    2.0,
                    ratio >= 2.0 and lower,
                    f"{number(ours['images_per_s'])} vs {number(theirs['images_per_s'])} images/s; "
                    f"p99 {p99(ours):.2f} vs {theirs['p99_ms']:.2f} ms",
                )
            )
    return out


def number(value: float | None) -> str:
    """A figure as text: thousands separated, "-" if missing."""
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:,.0f}"
    )


def figure(p: dict[str, Any] | None, key: str) -> float | None:
    """`p[key]` of a point that may be missing."""
    return None if p is None else p.get(key)
