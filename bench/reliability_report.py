"""The README's table of the reliability campaign, from bench/results/reliability.json.

    .venv/bin/python -m bench.reliability_report                      # printed
    .venv/bin/python -m bench.reliability_report --readme README.md   # into its marked block

The table sits between `<!-- reliability:begin -->` and `<!-- reliability:end -->`; a test
regenerates it from the committed file and fails on any difference. `make reliability --only`
merges its scenarios into the file's older ones, so the text says which run each came from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.readme_block import replace_block

RESULTS = Path(__file__).resolve().parent / "results" / "reliability.json"


def ms(value: float) -> str:
    """Milliseconds as the table shows them: two figures below 10, whole ones above."""
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def mb(value: float) -> str:
    return f"{value:.0f}"


def codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n:,}" for code, n in sorted(counts.items()))


def fuzz(f: dict[str, Any]) -> str:
    methods = sorted({key.split()[0] for key in f["answers"]})
    answered = sorted({code for counts in f["answers"].values() for code in counts})
    rss = ", ".join(mb(v) for v in f["settled_rss_mb_before_and_after_each_pass"])
    return (
        f"{f['cases']:,} hypothesis cases over every field of every request and as raw bytes "
        f"for all {len(methods)} methods: answers {', '.join(answered)}, "
        f"{f['unacceptable_answers']} unacceptable (INTERNAL, UNKNOWN or a hang); RSS read "
        f"after the same largest valid requests before and after each of its {f['passes']} "
        f"passes: {rss} MB (growth {f['rss_growth_percent']:+.2f}% from the first to the last)"
    )


def overload(o: dict[str, Any]) -> str:
    ok, refused = o["ok_latency_ms"], o["refusal_latency_ms"]
    health = o["health_during_overload"]
    flags = " ".join(f"`{flag}`" for flag in o["server_flags"])
    return (
        f"open loop at {o['factor']:g}x the measured capacity ({o['offered_calls_per_s']:.0f} "
        f"calls/s against {o['capacity_calls_per_s']:g}; {o['request']}; {flags}) for "
        f"{o['seconds']:g} s: {o['ok']:,} answered OK, p50 {ms(ok['p50'])} ms, p99 "
        f"{ms(ok['p99'])} ms ({o['ok_calls_per_s']:.0f} calls/s); {o['resource_exhausted']:,} "
        f"refused RESOURCE_EXHAUSTED, p50 {ms(refused['p50'])} ms, p99 {ms(refused['p99'])} ms; "
        f"health checks meanwhile p50 {ms(health['latency_ms']['p50'])} ms, p99 "
        f"{ms(health['latency_ms']['p99'])} ms, {sum(health['failures'].values())} failed; "
        f"RSS {mb(o['rss_mb_before'])} MB, peak {mb(o['rss_mb_peak'])} MB; other statuses: "
        f"{codes(o['other_codes']) or 'none'}"
    )


def limits(lim: dict[str, Any]) -> str:
    big, many = lim["oversized_messages"], lim["concurrent_large_messages"]
    return (
        f"{big['sent']} messages of {big['message_mb']:g} MB (above the "
        f"{lim['max_message_bytes'] / 2**20:g} MiB limit): {', '.join(big['codes'])} from gRPC; "
        f"{many['at_once']} at once of {many['message_mb']:g} MB, {many['rounds']} times: "
        f"{', '.join(many['codes'])} (`{many['details']}`); RSS from {mb(lim['rss_mb_before'])} "
        f"MB to a peak of {mb(lim['rss_mb_peak'])} MB, memory the allocator keeps under the "
        "Makefile's `MALLOC_TRIM_THRESHOLD_`"
    )


def sigterm(t: dict[str, Any]) -> str:
    return (
        f"{t['load']}: the {t['outstanding_at_sigterm']} calls in flight at the signal, "
        f"{t['outstanding_ended_ok']} ended OK; new calls were refused by gRPC itself "
        f"({codes(t['calls_after_sigterm'])} on this retry-less channel); exit "
        f"{t['exit_code']} after {t['seconds_to_exit']:g} s: {t['calls_lost']} admitted calls lost"
    )


def sigkill(k: dict[str, Any]) -> str:
    retried, bare = k["client_with_retries"], k["client_without_retries"]
    lost = {code: n for code, n in bare["codes"].items() if code != "OK"}
    return (
        f"{k['load']}; `{k['target']}` with the client's retry policy: {retried['calls']:,} "
        f"calls, {retried['failed']} failed: the calls in flight on A at the kill "
        f"({k['a_in_flight_at_kill']:.0f} by its metrics) were retried on B, the slowest call "
        f"across the kill took {ms(retried['worst_latency_spanning_kill_ms'])} ms; a client "
        f"without retries lost {sum(lost.values())} ({codes(lost) or 'none'})"
    )


def reload(r: dict[str, Any]) -> str:
    rejected = "rejected" if r["corrupted_version_rejected"] else "NOT rejected"
    return (
        f"{r['load']}: corrupted version + SIGHUP: {rejected}, version "
        f"{r['version_after_corrupted_reload']} kept serving; good version + SIGHUP: version "
        f"{r['version_after_good_reload']} live; {r['calls']:,} calls, {r['calls_failed']} "
        f"failed, p99 {ms(r['call_latency_ms']['p99'])} ms"
    )


def tls(t: dict[str, Any]) -> str:
    return (
        f"{t['truncated_handshakes']} truncated handshakes, {t['stalled_handshakes_held_open']} "
        f"stalled ones held open, {t['plaintext_clients']} plaintext clients "
        f"({codes(t['plaintext_client_codes'])}): then {t['tls_calls_after_ok']} TLS calls, all "
        f"OK; RSS {mb(t['rss_mb_before'])} to {mb(t['rss_mb_after'])} MB"
    )


def soak(s: dict[str, Any]) -> str:
    return (
        f"{s['seconds']:g} s of mixed load ({s['load']}), {s['calls']:,} calls at "
        f"{s['calls_per_s']:.0f}/s, p99 {ms(s['latency_ms']['p99'])} ms: {s['errors']} errors; "
        f"RSS {s['rss_mb_after_warm_up']:g} MB after the {s['warm_up_seconds']:g} s warm-up, "
        f"{s['rss_mb_final']:g} MB at the end: {s['rss_growth_percent']:+.1f}% (trend "
        f"{s['rss_trend_mb_per_minute']:.1f} MB a minute, peak "
        f"{s['rss_mb_peak_after_warm_up']:g} MB)"
    )


def peers(p: dict[str, Any]) -> str:
    r, u = p["slow_readers"], p["stalled_uploads"]
    m, d = p["idle_metrics_connections"], p["drain"]
    return (
        f"{r['load']}: RSS {mb(r['rss_mb_before'])} to {mb(r['while_held']['rss_mb'])} MB, "
        f"{mb(r['while_held']['pending_reply_mb'])} MB of replies held (the budget: 268), then "
        f"{r['after_reply_timeout']['stalled_replies_cut']:.0f} peers cut at the reply timeout; "
        f"{u['load']}: RSS {mb(u['rss_mb_before'])} to {mb(u['rss_mb_with_all_stalled'])} MB, "
        f"{u['ended_at_request_timeout']:.0f} ended at the request timeout; "
        f"{m['idle_connections']} idle /metrics connections: {m['threads_before']} threads "
        f"before, {m['threads_with_idle_connections']} with them; {d['burst']}: "
        f"{codes(d['burst_codes'])}, exit {d['burst_exit_code']} after "
        f"{d['burst_seconds_to_exit']:g} s; an idle server with an open health Watch and an idle "
        f"connection left {d['idle_with_watch_and_tcp_seconds_to_exit']:g} s after SIGTERM "
        f"(grace period {d['idle_grace_period_s']} s)"
    )


ROWS = {
    "fuzz": ("hostile input", fuzz),
    "overload": ("overload", overload),
    "limits": ("request limits", limits),
    "sigterm": ("SIGTERM under load", sigterm),
    "sigkill": ("SIGKILL one of two", sigkill),
    "reload": ("model reloads under load", reload),
    "tls": ("TLS faults", tls),
    "soak": ("soak", soak),
    "peers": ("hostile peers and the drain", peers),
}


def provenance(report: dict[str, Any]) -> str:
    """Which run each scenario came from. Scenarios carry their own `measured_at` and commit
    (bench/reliability.py writes them); in an older file, those named by the last command's
    `--only` are from its run, and the rest from an earlier run the file does not date."""
    command, created = report["command"], report["created_at"]
    words = command.split()
    only: list[str] = []
    for i, word in enumerate(words):
        if word.startswith("--only="):
            only = word.removeprefix("--only=").split(",")
        elif word == "--only" and i + 1 < len(words):
            only = words[i + 1].split(",")
    runs: dict[str, list[str]] = {}
    for name, result in report["scenarios"].items():
        if "measured_at" in result:
            commit = result.get("git_commit")
            run = f"{result['measured_at']}" + (f", commit {commit}" if commit else "")
        elif not only or name in only:
            run = f"`{command}` of {created}, no commit recorded"
        else:
            run = "an earlier full run that the file does not date, no commit recorded"
        runs.setdefault(run, []).append(name)
    return "; ".join(f"{', '.join(names)}: {run}" for run, names in runs.items())


def markdown(report: dict[str, Any]) -> str:
    scenarios = report["scenarios"]
    loads = [r["machine"]["load_average"][0] for r in scenarios.values() if "machine" in r]
    seconds = sum(r.get("wall_seconds", 0.0) for r in scenarios.values())
    head = (
        f"**The campaign's figures** (`bench/results/reliability.json`, model "
        f"`{report['model']}`; {report['note']}; one-minute load average "
        f"{min(loads):.1f} to {max(loads):.1f}; the scenarios took {seconds:.0f} s together). "
        f"Measured: {provenance(report)}.\n\n"
    )
    rows = [
        f"| {title} | {describe(scenarios[name])} |"
        for name, (title, describe) in ROWS.items()
        if name in scenarios
    ]
    lost = report["summary"]["calls_lost"]
    table = "| scenario | result |\n|---|---|\n" + "\n".join(rows)
    return f"{head}{table}\n\nCalls lost across all faults: {lost}.\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="?", default=RESULTS)
    parser.add_argument("--readme", type=Path, help="rewrite its reliability block")
    args = parser.parse_args(argv)
    text = markdown(json.loads(args.results.read_text()))
    print(text)
    if args.readme:
        args.readme.write_text(replace_block(args.readme.read_text(), "reliability", text))
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
