"""The goals' arithmetic and the markdown of `make bench`, on a results document built here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import goals, report


def _point(
    server: str, method: str, count: int, fmt: str, c: int, rps: float, **extra: Any
) -> dict:
    return {
        "server": server,
        "label": f"{method.capitalize()}({count}, {fmt})",
        "method": method,
        "count": count,
        "image_format": fmt,
        "concurrency": c,
        "requests_per_s": rps,
        "images_per_s": rps * count,
        "latency_ms": {"p50": 1.0, "p99": extra.pop("p99", 2.0)},
        "errors": {},
        "server_cpu_percent": 95.0,
        "client_cpu_percent": 40.0,
        **extra,
    }


def _results(*, on_off: float = 1.0, rows: float = 3.0, sample1: float = 3000.0) -> dict:
    points = [
        _point("service", "sample", 1024, "uint8", 1, 80.0),
        _point("service", "sample", 1024, "uint8", 8, 90.0),  # the best: 92,160 images/s
        _point("service", "sample", 64, "uint8", 32, 1000.0, p99=10.0),
        _point("noop", "sample", 1, "uint8", 32, 4000.0),
        _point("service", "sample", 1, "uint8", 32, sample1, p99=5.0),
        _point("service", "sample", 1, "uint8", 64, 3000.0, section="batching", rows_per_run=rows),
        _point("batching_off", "sample", 1, "uint8", 64, 3000.0 / on_off, section="batching"),
    ]
    return {
        "generated_at": "2026-12-01T00:00:00+00:00",
        "git_commit": "abc1234",
        "machine": {"cpus": 2, "loadavg_at_start": [1.0, 1, 1], "loadavg_at_end": [2.0, 1, 1]},
        "server_cpus": "0",
        "client_cpus": "1",
        "duration_s": 8.0,
        "warmup_s": 1.0,
        "total_s": 700.0,
        "env": {"MALLOC_MMAP_THRESHOLD_": "33554432"},
        "server_args": ["--max-queue-rows", "65536"],
        "limit": {
            "rounds": 3,
            "onnxruntime": {
                "points": [
                    {"batch": 64, "images_per_s": 100_000.0},
                    {"batch": 1024, "images_per_s": 100_000.0},
                ]
            },
            "pipeline": {"points": [{"batch": 64, "images_per_s": 90_000.0}]},
            "torch": {"points": [{"batch": 64, "images_per_s": 50_000.0}]},
        },
        "points": points,
        "servers": {
            "service": {
                "startup_s": 1.5,
                "internal_startup_s": 0.4,
                "rss_mb": {
                    "idle": 90.0,
                    "first": 110.0,
                    "peak": 160.0,
                    "end": 150.0,
                    "growth": 40.0,
                },
            }
        },
        "peers": {
            "source": "peers.json",
            "generated_at": "2026-11-25T06:29:51+00:00",
            "duration_s": 5.0,
            "server_cpus": "0",
            "peers": {
                "triton": {
                    "points": [
                        {"count": 64, "concurrency": 32, "images_per_s": 40_000.0, "p99_ms": 20.0},
                        {"count": 1, "concurrency": 32, "images_per_s": 1000.0, "p99_ms": 4.0},
                    ]
                }
            },
        },
    }


def _by_goal(results: dict) -> dict[str, dict]:
    return {g["goal"].split(" /")[0].split(" (")[0]: g for g in goals.goals(results)}


def test_limit_ratios_use_the_best_concurrency_and_the_same_batch() -> None:
    goals = _by_goal(_results())
    assert goals["Sample(1024, uint8)"]["measured"] == pytest.approx(90 * 1024 / 100_000)
    assert goals["Sample(1024, uint8)"]["met"]  # 0.92 >= 0.8
    assert goals["Sample(64, uint8)"]["measured"] == pytest.approx(0.64)
    assert goals["Sample(64, uint8)"]["met"]


def test_the_transport_goal_compares_requests_with_the_noop_server() -> None:
    assert _by_goal(_results(sample1=3000.0))["Sample(1) at concurrency 32"]["measured"] == 0.75
    assert not _by_goal(_results(sample1=3000.0))["Sample(1) at concurrency 32"]["met"]
    assert _by_goal(_results(sample1=3800.0))["Sample(1) at concurrency 32"]["met"]


def test_batching_goals_allow_noise_but_not_a_slower_batcher_or_one_row_a_run() -> None:
    assert _by_goal(_results(on_off=0.97))["Batching on"]["met"]
    assert not _by_goal(_results(on_off=0.9))["Batching on"]["met"]
    assert not _by_goal(_results(rows=1.0))["Rows per run, 64 callers of one image, batching on"][
        "met"
    ]


def test_repeated_batching_points_count_their_best() -> None:
    results = _results(on_off=0.97)
    blip = _point("service", "sample", 1, "uint8", 64, 100.0, section="batching", rows_per_run=1)
    results["points"].append(blip)  # a second, spoiled, measurement of the same load
    assert _by_goal(results)["Batching on"]["measured"] == pytest.approx(0.97)


def test_peer_goals_need_twice_the_throughput_and_a_lower_p99() -> None:
    peers = {g["goal"]: g for g in goals.goals(_results()) if "triton" in g["goal"]}
    at64 = peers["Sample(64, uint8) x32 / triton, with a lower p99"]
    assert at64["measured"] == pytest.approx(1.6) and not at64["met"]
    at1 = peers["Sample(1, uint8) x32 / triton, with a lower p99"]
    assert at1["measured"] == pytest.approx(3.0)
    assert not at1["met"]  # 3x the throughput, but a p99 of 5 ms against 4


def test_markdown_has_every_table_and_the_peers_date() -> None:
    results = _results()
    results["goals"] = goals.goals(results)
    text = report.markdown(results)
    assert "2026-11-25T06:29:51" in text
    for heading in ("**Goals**", "**The limit**", "**The service**", "**Batching**", "**Peers**"):
        assert heading in text
    assert "| Sample(1024, uint8) | 8 | 90 | 92,160 |" in text
    assert "**not met**" in text


def test_missing_peers_are_said_so(tmp_path: Path) -> None:
    assert "make bench-peers" in goals.load_peers(tmp_path / "peers.json")["missing"]
    (tmp_path / "peers.json").write_text(json.dumps({"peers": {"mlserver": {"error": "boom"}}}))
    assert goals.load_peers(tmp_path / "peers.json")["peers"]["mlserver"] == {"error": "boom"}


def test_the_readme_block_is_replaced_and_nothing_else() -> None:
    text = f"before\n{report.BEGIN}\nold table\n{report.END}\nafter\n"
    assert (
        report.replace_block(text, "new\n") == f"before\n{report.BEGIN}\nnew\n{report.END}\nafter\n"
    )
    with pytest.raises(SystemExit):
        report.replace_block("no markers", "new\n")


def _with_int8(results: dict, *, rss: float = 120.0) -> dict:
    """The precision section: fp32 and int8 servers at the same points, int8 in process."""
    results["points"] += [
        _point("service", "sample", 64, "uint8", 8, 1200.0, section="precision", repeat=0),
        _point("int8", "sample", 64, "uint8", 8, 1500.0, section="precision", repeat=0),
        _point("int8", "sample", 64, "uint8", 8, 1000.0, section="precision", repeat=1),
        _point("int8", "sample", 1024, "uint8", 8, 130.0, section="precision", repeat=0),
    ]
    results["limit_int8"] = {
        "onnxruntime": {
            "points": [
                {"batch": 64, "images_per_s": 200_000.0},
                {"batch": 1024, "images_per_s": 210_000.0},
            ]
        }
    }
    results["servers"]["int8"] = {"startup_s": 1.5, "rss_mb_end": rss}
    return results


def test_precision_goals_divide_the_variant_served_by_fp32_in_process() -> None:
    by_goal = _by_goal(_with_int8(_results()))
    at1024 = by_goal["Sample(1024, uint8), int8 served"]
    assert at1024["measured"] == pytest.approx(130 * 1024 / 100_000) and at1024["met"]  # 1.33
    at64 = by_goal["Sample(64, uint8), int8 served"]  # the best repeat: 96,000 images/s
    assert at64["measured"] == pytest.approx(0.96) and at64["met"]
    assert by_goal["RSS of the int8 server at the end of the run, MB"]["met"]
    assert not _by_goal(_with_int8(_results(), rss=151.0))[
        "RSS of the int8 server at the end of the run, MB"
    ]["met"]
    assert not any("int8 serve" in g["goal"] for g in goals.goals(_results()))  # no variant


def test_the_precision_table_shows_each_precision_against_fp32_in_process() -> None:
    results = _with_int8(_results())
    results["goals"] = goals.goals(results)
    text = report.markdown(results)
    assert "**Precision**" in text
    row = "| int8 | `int8` | 200,000 | 96,000 (x8) | 2.00 | 0.96 | 210,000 | 133,120 (x8) |"
    assert row in text
    results.update(precision_skipped="models/x/1 has no int8 variant")
    assert "models/x/1 has no int8 variant" in report.markdown(results)
