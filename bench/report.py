"""The markdown tables of a `make bench` run (bench/results/bench.json), goals first.

    .venv/bin/python -m bench.report                      # bench.json -> bench.md, printed
    .venv/bin/python -m bench.report --readme README.md   # and into README's marked block

The README's Performance tables sit between the markers `<!-- bench:begin -->` and
`<!-- bench:end -->`; `--readme` rewrites that block only, so a new run is one command away
from the README.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import precisions
from bench.goals import (
    batching_pairs,
    figure,
    goals,
    limit_rate,
    number,
    p99,
    peer_point,
    point,
)

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _rate(p: dict[str, Any] | None) -> str:
    return number(p["images_per_s"]) if p else "-"


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def point_line(p: dict[str, Any]) -> str:
    rows = p.get("rows_per_run")
    return (
        f"{p['server']:12} {p['label']:22} x{p['concurrency']:<3} "
        f"{p['requests_per_s']:9,.0f} req/s {p['images_per_s']:11,.0f} img/s  "
        f"p50 {p['latency_ms'].get('p50', math.nan):7.2f} p99 {p99(p):7.2f} ms  "
        f"server CPU {p['server_cpu_percent']:3.0f}% "
        f"client CPU {p['client_cpu_percent']:3.0f}%"
        + (f"  rows/run {rows:.1f}" if rows else "")
        + (f"  errors {p['errors']}" if p["errors"] else "")
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def limit_table(results: dict[str, Any]) -> str:
    kinds = ("onnxruntime", "pipeline", "servicer", "torch")
    rows = []
    for p in results["limit"]["onnxruntime"]["points"]:
        n = p["batch"]
        ort, pipe, servicer, torch = (limit_rate(results, n, k) for k in kinds)
        rows.append(
            [
                str(n),
                number(ort),
                number(pipe),
                number(servicer),
                number(torch),
                f"{ort / torch:.1f}x" if ort and torch else "-",
            ]
        )
    header = ["batch", "ONNX Runtime", "Sample pipeline", "servicer, no gRPC", "PyTorch eager",
              "ORT / PyTorch"]  # fmt: skip
    return table(header, rows)


def service_table(results: dict[str, Any]) -> str:
    rows = []
    for p in results["points"]:
        if p["server"] != "service" or p.get("section"):
            continue
        key = (p["method"], p["count"], p["image_format"], p["concurrency"])
        floor = point(results, "noop", *key)
        share = f"{p['requests_per_s'] / floor['requests_per_s']:.2f}" if floor else "-"
        rows.append(
            [
                p["label"],
                str(p["concurrency"]),
                number(p["requests_per_s"]),
                number(p["images_per_s"]),
                _ms(p["latency_ms"].get("p50")),
                _ms(p99(p)),
                f"{p['rows_per_run']:.1f}" if p.get("rows_per_run") else "-",
                number(cpu_us(p)),
                number(figure(floor, "requests_per_s")),
                number(cpu_us(floor)),
                share,
                f"{p['client_cpu_percent']:.0f}",
                _errors(p),
            ]
        )
    header = ["load", "in flight", "requests/s", "images/s", "p50 ms", "p99 ms", "rows/run",
              "server CPU us/call", "no-op requests/s", "no-op CPU us/call", "of no-op",
              "client CPU %", "errors"]  # fmt: skip
    return table(header, rows)


def cpu_us(p: dict[str, Any] | None) -> float | None:
    """The server's CPU time a call, in microseconds, over the measured window."""
    if not p or not p["requests_per_s"]:
        return None
    return float(1e4 * p["server_cpu_percent"] / p["requests_per_s"])


def _errors(p: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in p["errors"].items()) or "0"


def batching_table(results: dict[str, Any]) -> str:
    rows = []
    for on, off in batching_pairs(results):
        rows.append(
            [
                on["label"],
                str(on["concurrency"]),
                number(on["images_per_s"]),
                _ms(p99(on)),
                f"{on['rows_per_run']:.1f}" if on.get("rows_per_run") else "-",
                number(off["images_per_s"]),
                _ms(p99(off)),
                f"{on['images_per_s'] / off['images_per_s']:.2f}" if off["images_per_s"] else "-",
            ]
        )
    header = ["load", "in flight", "on: images/s", "on: p99 ms", "on: rows/run",
              "off: images/s", "off: p99 ms", "on / off"]  # fmt: skip
    return table(header, rows)


def peers_table(results: dict[str, Any]) -> str:
    info = results.get("peers", {})
    if "missing" in info:
        return info["missing"]
    names = list(info["peers"])
    rows = []
    loads = {
        (p["count"], p["concurrency"])
        for peer in info["peers"].values()
        for p in peer.get("points", [])
    }
    for count, concurrency in sorted(loads):
        ours = point(results, "service", "sample", count, "uint8", concurrency)
        row = [f"Sample({count}, uint8)", str(concurrency), _rate(ours), _ms(p99(ours))]
        for name in names:
            theirs = peer_point(info["peers"][name], count, concurrency)
            ratio = ours["images_per_s"] / theirs["images_per_s"] if ours and theirs else None
            row += [
                number(figure(theirs, "images_per_s")),
                _ms(figure(theirs, "p99_ms")),
                f"{ratio:.1f}x" if ratio else "-",
            ]
        rows.append(row)
    header = ["load", "in flight", "ours: images/s", "ours: p99 ms"]
    for name in names:
        header += [f"{name}: images/s", f"{name}: p99 ms", f"ours / {name}"]
    return table(header, rows)


def goals_table(results: dict[str, Any]) -> str:
    rows = [
        [
            g["goal"],
            "-" if g["measured"] is None else f"{g['measured']:.2f}",
            f"{g['target']:g}",
            "met" if g["met"] else "**not met**",
            g["detail"],
        ]
        for g in results["goals"]
    ]
    return table(["goal", "measured", "target", "", "figures"], rows)


def before(later: str, earlier: str) -> str:
    """How long before the ISO time `later` the ISO time `earlier` was, in words."""
    gap = datetime.fromisoformat(later) - datetime.fromisoformat(earlier)
    minutes = gap.total_seconds() / 60
    if minutes < 120:
        return f"{minutes:.0f} minute{'' if round(minutes) == 1 else 's'} before"
    if minutes < 2880:
        return f"{minutes / 60:.0f} hours before"
    return f"{minutes / 1440:.1f} days before"


def later_peers_note(results: dict[str, Any], committed: dict[str, Any] | None) -> str:
    """A sentence when `committed` (peers.json as it is now) is not the peers run that this
    bench run copied into bench.json: its figures are not the ones in these tables."""
    copied = results.get("peers", {}).get("generated_at")
    if committed is None or copied is None or committed.get("generated_at") == copied:
        return ""
    return (
        f" The tables quote that copy, kept in `bench.json`; the committed `peers.json` is a "
        f"later `make bench-peers` ({committed['generated_at']}), whose figures differ."
    )


def markdown(results: dict[str, Any], committed_peers: dict[str, Any] | None = None) -> str:
    """The report of `results` (bench.json, goals added); `committed_peers`: peers.json as it
    is now, to say so when it is not the run this one copied."""
    m, peers = results["machine"], results.get("peers", {})
    env = ", ".join(f"`{k}={v}`" for k, v in results["env"].items())
    service = results["servers"]["service"]
    rss = service["rss_mb"]
    peers_line = (
        f"`{peers['source']}` from `make bench-peers` of {peers['generated_at']} "
        f"({peers['duration_s']:g} s a point, server on cpus {peers['server_cpus']}), "
        f"{before(results['generated_at'], peers['generated_at'])} this run: a separate run, so "
        "these ratios are across runs." + later_peers_note(results, committed_peers)
        if "source" in peers
        else peers.get("missing", "")
    )
    server_args = " ".join(["vae-serve", *results.get("server_args", [])])
    chip = m.get("cpu")
    cpus = f"{m['cpus']} CPUs" + (
        f" ({chip['model_name']}; {' '.join(chip['avx_flags'])})" if chip else ""
    )
    parts = [
        f"Run of {results['generated_at']} (commit {results['git_commit']}), "
        f"{cpus}, servers on cpus {results['server_cpus']}, load generator on cpus "
        f"{results['client_cpus']}; {results['duration_s']:g} s measured a point after "
        f"{results['warmup_s']:g} s of warm-up; {results['total_s']:.0f} s in all. Load average "
        f"{m['loadavg_at_start'][0]:.1f} at the start, {m['loadavg_at_end'][0]:.1f} at the end "
        f"(a shared machine: other jobs skew single points). Allocator: {env}.",
        "**Goals** (ratios within this run; against the peers, across runs: see below):\n\n"
        + goals_table(results),
        f"**The limit**, images/s in process on cpus {results['server_cpus']} (best of "
        f"{results['limit'].get('rounds', 1)} interleaved bursts; ONNX Runtime: the best of a "
        "pass before the servers and one after). ONNX Runtime: the decoder session alone; "
        "Sample pipeline: prior draw, decoder to uint8 images; servicer: "
        "`VaeServicer.Sample` awaited directly (batcher, executor, metrics), no gRPC:\n\n"
        + limit_table(results),
        f"**The service** (`{server_args}`, batching on) "
        'and the **no-op server** at the same points ("of no-op": the service\'s requests/s '
        "over the floor's):\n\n" + service_table(results),
        "**Batching** on against `--no-batching`, measured back to back:\n\n"
        + batching_table(results),
        "**Precision**: `vae-serve --precision int8` beside the fp32 service, Sample(uint8) at 8 "
        "and 32 in flight, back to back, twice (the best point shown); in process: the decoder "
        "session alone at each precision (best of a pass before the servers and one after); "
        "the last column divides served images/s by fp32's in-process figure:\n\n"
        + precisions.table(results),
        "**Peers**, uint8 outputs: " + peers_line + "\n\n" + peers_table(results),
        f"**Memory and start-up**: `vae-serve` RSS {number(rss['idle'])} MB idle after start-up, "
        f"{number(rss['first'])} MB after its first point, peak {number(rss['peak'])} MB, "
        f"{number(rss['end'])} MB at the end (growth {rss['growth']:+.1f} MB from the first point "
        "to the end: the large replies' buffers, which glibc keeps under "
        "`MALLOC_TRIM_THRESHOLD_`, not a leak unless it grows again on repeated loads). "
        f"Start-up to SERVING: {service['startup_s']:.2f} s from the spawn to a SERVING health "
        f"check, of which {service['internal_startup_s'] or math.nan:.2f} s to verify, load "
        "and warm up the model (the server's own log); the rest is Python's start-up and "
        "imports.",
    ]
    return "\n\n".join(parts) + "\n"


def replace_block(text: str, block: str) -> str:
    """`text` with the part between the bench markers replaced by `block`."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"no {BEGIN} ... {END} block to replace")
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="?", default=RESULTS / "bench.json")
    parser.add_argument("--readme", type=Path, help="rewrite its bench block with the tables")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    results["goals"] = goals(results)
    committed = RESULTS / "peers.json"
    text = markdown(results, json.loads(committed.read_text()) if committed.exists() else None)
    args.results.with_suffix(".md").write_text(text)
    print(text)
    if args.readme:
        args.readme.write_text(replace_block(args.readme.read_text(), text))
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
