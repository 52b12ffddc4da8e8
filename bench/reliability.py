"""The reliability campaign (`make reliability`): hostile input, overload, faults and a soak,
against real `vae-serve` processes serving the default model; figures to
bench/results/reliability.json, pass or fail on the issue's criteria.

    .venv/bin/python bench/reliability.py                     # the whole campaign, ~8 minutes
    .venv/bin/python bench/reliability.py --only fuzz,overload --soak-seconds 60

Scenarios: `fuzz` (thousands of hypothesis cases over every field and as raw bytes; RSS before
and after), `overload` (open loop at several times the measured capacity: admitted calls
succeed, the rest are refused RESOURCE_EXHAUSTED, health answers throughout), in
bench/reliability_fuzz.py and bench/reliability_overload.py; `limits`
(bench/reliability_limits.py: oversized and many large messages), and in
bench/reliability_faults.py `sigterm`, `sigkill` and `reload`, `tls` (bench/reliability_tls.py),
`soak` (bench/reliability_soak.py), and in
bench/reliability_peers.py `peers` (slow readers, stalled uploads, idle /metrics connections, a
burst at SIGTERM, an idle server's exit). The machine is
shared (a training run and other benchmarks may be on it): load averages are recorded beside
every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the checkout importable
    sys.path.insert(0, str(ROOT))

from bench.machine import git_commit, load_now  # noqa: E402
from bench.reliability_fuzz import fuzz  # noqa: E402
from bench.reliability_overload import overload  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "reliability.json"


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue asks for, from whichever scenarios ran."""
    out: dict[str, Any] = {"load_average_at_end": load_now()["load_average"]}
    if "fuzz" in results:
        f = results["fuzz"]
        out["cases_fuzzed"] = f["cases"]
        out["fuzz_unacceptable_answers"] = f["unacceptable_answers"]
        out["fuzz_rss_growth_percent"] = f["rss_growth_percent"]
    if "overload" in results:
        o = results["overload"]
        out["overload"] = {
            k: o[k]
            for k in ("capacity_calls_per_s", "offered_calls_per_s", "seconds", "ok_calls_per_s")
        }
        out["overload"]["ok_p99_ms"] = o["ok_latency_ms"].get("p99")
        out["overload"]["refusal_p99_ms"] = o["refusal_latency_ms"].get("p99")
        out["overload"]["health_p99_ms"] = o["health_during_overload"]["latency_ms"].get("p99")
        out["overload"]["rss_mb_peak"] = o["rss_mb_peak"]
    if "limits" in results:
        lim = results["limits"]
        out["limits"] = {
            "oversized_messages_refused": lim["oversized_messages"]["codes"],
            "peak_rss_over_baseline_mb": lim["peak_over_before_mb"],
        }
    faults = {
        "sigterm_under_load": results.get("sigterm", {}).get("passed"),
        "sigkill_one_of_two": results.get("sigkill", {}).get("passed"),
        "corrupted_model_reload": results.get("reload", {}).get("corrupted_version_rejected"),
        "truncated_tls_handshakes": results.get("tls", {}).get("truncated_handshakes"),
        "plaintext_clients_to_tls": results.get("tls", {}).get("plaintext_clients"),
    }
    out["faults"] = {k: v for k, v in faults.items() if v is not None}
    lost = [results[s].get("calls_lost", 0) for s in ("sigterm",) if s in results]
    lost += [results["sigkill"]["client_with_retries"]["failed"]] if "sigkill" in results else []
    lost += [results["reload"]["calls_failed"]] if "reload" in results else []
    out["calls_lost"] = sum(lost)
    if "peers" in results:
        p = results["peers"]
        out["hostile_peers"] = {
            "slow_readers_rss_mb": p["slow_readers"]["while_held"]["rss_mb"],
            "slow_readers_pending_reply_mb": p["slow_readers"]["while_held"]["pending_reply_mb"],
            "stalled_uploads_rss_mb": p["stalled_uploads"]["rss_mb_with_all_stalled"],
            "metrics_threads_with_500_idle": p["idle_metrics_connections"][
                "threads_with_idle_connections"
            ],
            "burst_at_sigterm_codes": p["drain"]["burst_codes"],
            "idle_exit_seconds": p["drain"]["idle_with_watch_and_tcp_seconds_to_exit"],
        }
    if "soak" in results:
        out["soak_rss_growth_percent"] = results["soak"]["rss_growth_percent"]
        out["soak_errors"] = results["soak"]["errors"]
    out["all_passed"] = all(r.get("passed") for r in results.values())
    return out


# -- the campaign -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from bench import reliability_faults as faults
    from bench.reliability_limits import request_limits
    from bench.reliability_peers import hostile_peers
    from bench.reliability_soak import soak
    from bench.reliability_tls import tls_faults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-repo", type=Path, default=ROOT / "models")
    p.add_argument("--model-name", default="mnist-vae")
    p.add_argument("--only", help="comma-separated scenarios (default: all)")
    p.add_argument("--fuzz-cases", type=int, default=800, help="field cases per method")
    p.add_argument("--raw-cases", type=int, default=400, help="raw-bytes cases per method")
    p.add_argument("--overload-seconds", type=float, default=20.0)
    p.add_argument("--overload-factor", type=float, default=4.0, help="times the capacity")
    p.add_argument(
        "--overload-max-in-flight",
        type=int,
        default=16,
        help="the server's max_in_flight during the overload (the admitted calls' latency is "
        "about this over the throughput)",
    )
    p.add_argument("--soak-seconds", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=20261201)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    repo, name = args.model_repo, args.model_name
    scenarios: dict[str, Callable[[], dict[str, Any]]] = {
        "fuzz": lambda: fuzz(repo, name, args.fuzz_cases, args.raw_cases, args.seed),
        "overload": lambda: overload(
            repo, name, args.overload_seconds, args.overload_factor, args.overload_max_in_flight
        ),
        "limits": lambda: request_limits(repo, name),
        "sigterm": lambda: faults.sigterm_under_load(repo, name),
        "sigkill": lambda: faults.sigkill_failover(repo, name),
        "reload": lambda: faults.reload_under_load(repo, name),
        "tls": lambda: tls_faults(repo, name),
        "soak": lambda: soak(repo, name, args.soak_seconds),
        "peers": lambda: hostile_peers(repo, name),
    }
    chosen = args.only.split(",") if args.only else list(scenarios)
    results: dict[str, Any] = {}
    for scenario in chosen:
        print(f"== {scenario} (load average {load_now()['load_average']})", flush=True)
        began = time.monotonic()
        result = scenarios[scenario]()
        result["machine"] = load_now()
        result["wall_seconds"] = round(time.monotonic() - began, 1)
        # Each scenario says when and on which commit it ran: a partial run (--only) merges
        # its scenarios into an older file, so the file's own date is not every scenario's.
        result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        result["git_commit"] = git_commit()
        results[scenario] = result
        print(json.dumps(result, indent=1)[:3000], flush=True)

    report: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m bench.reliability", *(sys.argv[1:] if argv is None else argv)]
        ),
        "model": f"{repo.name}/{name}",
        "note": "a 2-core machine shared with other jobs: latencies and RSS readings are noisy",
        "summary": summary(results),
        "scenarios": results,
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.only and previous.get("scenarios"):  # a partial run keeps the other figures
        report["scenarios"] = {**previous["scenarios"], **results}
        report["summary"] = summary(report["scenarios"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    failed = [s for s, r in results.items() if not r.get("passed")]
    print(f"wrote {args.out}; " + (f"FAILED: {', '.join(failed)}" if failed else "all passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
