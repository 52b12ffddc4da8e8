"""The README's figures are its results files': the marked blocks (bench, profile, reliability)
are regenerated from the committed bench/results/*.json and must be identical, and every figure
the surrounding prose quotes is recomputed from the same files and must appear as written. A
new `make bench`, `make bench-profile`, `make reliability`, `make bench-peers`, `make
bench-quality` or `python -m bench.default_model` that changes a figure fails here until the
README says what the file says."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench import profile, reliability_report, report
from bench.goals import batching_pairs, best, goals, limit_rate, peer_point, point
from bench.readme_block import block

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / name).read_text())
    return data


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


@pytest.fixture(scope="module")
def prose(readme: str) -> str:
    """The README's words with every run of white space (line breaks, indents) as one space."""
    return re.sub(r"\s+", " ", readme)


@pytest.fixture(scope="module")
def bench() -> dict[str, Any]:
    results = load("bench.json")
    results["goals"] = goals(results)
    return results


def quoted(prose: str, *phrases: str) -> None:
    for phrase in phrases:
        assert re.sub(r"\s+", " ", phrase) in prose, f"the README does not say: {phrase!r}"


# ---- the generated blocks ----


def test_the_bench_block_is_bench_json(readme: str, bench: dict[str, Any]) -> None:
    text = report.markdown(bench, load("peers.json"))
    assert block(readme, "bench") == text
    assert (RESULTS / "bench.md").read_text() == text


def test_the_profile_block_is_profile_json(readme: str) -> None:
    text = profile.markdown(load("profile.json"))
    assert block(readme, "profile") == text
    assert (RESULTS / "profile.md").read_text() == text


def test_the_reliability_block_is_reliability_json(readme: str) -> None:
    assert block(readme, "reliability") == reliability_report.markdown(load("reliability.json"))


# ---- figures in the prose ----


def service(bench: dict[str, Any], count: int, concurrency: int) -> dict[str, Any]:
    found = point(bench, "service", "sample", count, "uint8", concurrency)
    assert found is not None
    return found


def cpu_us(p: dict[str, Any] | None) -> float:
    value = report.cpu_us(p)
    assert value is not None
    return value


def test_the_performance_prose_quotes_bench_json(prose: str, bench: dict[str, Any]) -> None:
    goal = {g["goal"]: g for g in bench["goals"]}
    quoted(prose, f"The run below took {bench['total_s']:.0f} s")

    transport = goal["Sample(1) at concurrency 32 / no-op server's requests/s"]
    shares = []
    for p in bench["points"]:
        if p["server"] == "service" and not p.get("section") and p["count"] == 1:
            floor = point(bench, "noop", p["method"], 1, p["image_format"], p["concurrency"])
            assert floor is not None
            shares.append(p["requests_per_s"] / floor["requests_per_s"])
    quoted(
        prose,
        f"Sample(1) at 32 in flight: {transport['measured']:.2f} of the no-op server's "
        f"requests/s; the goal is {transport['target']:g}** (not met; {min(shares):.2f} to "
        f"{max(shares):.2f} over the count-1 points)",
    )
    one = service(bench, 1, 32)
    ours, noop_cpu = cpu_us(one), cpu_us(point(bench, "noop", "sample", 1, "uint8", 32))
    quoted(
        prose,
        f"the no-op server spends {noop_cpu:.0f} us of CPU a call, the service {ours:.0f} us, "
        f"{ours / noop_cpu:.2f} times as much",
        f"adds only ~{ours - noop_cpu:.0f} us to gRPC's {noop_cpu:.0f}",
        f"{noop_cpu:.0f} us a call; the service's ~{ours - noop_cpu:.0f} us on top",
        f"one decoder run shared by ~{one['rows_per_run']:.0f} calls",
    )
    servicer, pipeline1 = limit_rate(bench, 1, "servicer"), limit_rate(bench, 1, "pipeline")
    assert servicer is not None and pipeline1 is not None
    quoted(
        prose,
        f"`VaeServicer.Sample(1)` runs {servicer:,.0f} calls/s ({1e6 / servicer:.0f} us a call",
        f"the Sample pipeline alone {pipeline1:,.0f}/s ({1e6 / pipeline1:.0f} us)",
    )
    ort1 = limit_rate(bench, 1)
    assert ort1 is not None
    quoted(prose, f"ONNX Runtime's run of one row {ort1:,.0f}/s ({1e6 / ort1:.0f} us")

    big = goal["Sample(1024, uint8) / in-process ONNX Runtime (batch 1024)"]
    served = best(bench, 1024, "uint8")
    assert served is not None
    pipeline = limit_rate(bench, 1024, "pipeline")
    assert pipeline is not None
    quoted(
        prose,
        f"Sample(1024, uint8): {big['measured']:.2f} of the bare ONNX Runtime session; the goal "
        f"is {big['target']:g}** (not met)",
        f"it reaches {served['images_per_s'] / pipeline:.2f} ({served['images_per_s']:,.0f} of "
        f"{pipeline:,.0f} images/s)",
    )
    mid = goal["Sample(64, uint8) / in-process ONNX Runtime (batch 64)"]
    quoted(
        prose,
        f"Sample(64): {mid['measured']:.2f} of ONNX Runtime at batch 64** (goal "
        f"{mid['target']:g}, {'met' if mid['met'] else 'not met'}",
    )
    on_off = {f"{on['label']} x{on['concurrency']}": (on, off) for on, off in batching_pairs(bench)}
    ratio = {k: on["images_per_s"] / off["images_per_s"] for k, (on, off) in on_off.items()}
    single, _ = on_off["Sample(1, uint8) x64"]
    wide_on, wide_off = on_off["Sample(64, uint8) x32"]
    quoted(
        prose,
        f"Batching on against off: {ratio['Sample(1, uint8) x1']:.2f} at one caller, "
        f"{ratio['Sample(1, uint8) x64']:.2f} for 64 callers of one image, "
        f"{ratio['Sample(64, uint8) x32']:.2f} for 32 of 64 images**",
        f"at {single['rows_per_run']:.1f} rows a run for single images",
        f"({report.p99(wide_on):.0f} against {report.p99(wide_off):.0f} ms at Sample(64) x32)",
    )


def test_the_peers_prose_quotes_the_run_on_file(prose: str, bench: dict[str, Any]) -> None:
    copied, committed = bench["peers"], load("peers.json")
    assert copied["generated_at"] == committed["generated_at"]  # else the prose names both
    quoted(
        prose,
        f"the run on file is of {committed['generated_at'][:19]}, the one `make bench` copied "
        "into `bench.json`",
    )

    def theirs(name: str, count: int) -> dict[str, Any]:
        found = peer_point(copied["peers"][name], count, 32)
        assert found is not None
        return found

    t1, t64 = theirs("triton", 1), theirs("triton", 64)
    m1, m64 = theirs("mlserver", 1), theirs("mlserver", 64)
    quoted(
        prose,
        f"Triton served {t1['requests_per_s']:,.0f} requests/s at count 1 x32 and "
        f"{t64['images_per_s']:,.0f} images/s at count 64 x32; MLServer "
        f"{m1['requests_per_s']:,.0f} and {m64['images_per_s']:,.0f}.",
    )
    ours1, ours64 = service(bench, 1, 32), service(bench, 64, 32)
    against_m = [ours1["requests_per_s"] / m1["requests_per_s"]]
    against_m.append(ours64["images_per_s"] / m64["images_per_s"])
    quoted(
        prose,
        f"the service is {ours1['requests_per_s'] / t1['requests_per_s']:.2f} times Triton at "
        f"count 1 and {ours64['images_per_s'] / t64['images_per_s']:.2f} at count 64 x32, with "
        f"a lower p99 each time; against MLServer {min(against_m):.2f} to {max(against_m):.2f} "
        "times",
    )
    for ours, peer in ((ours1, t1), (ours64, t64), (ours1, m1), (ours64, m64)):
        assert report.p99(ours) < peer["p99_ms"]  # "a lower p99 each time"
    pipeline64 = limit_rate(bench, 64, "pipeline")
    int8_64 = max(
        p["images_per_s"]
        for p in bench["points"]
        if p.get("section") == "precision" and p["server"] == "int8" and p["count"] == 64
    )
    noop = [
        p["requests_per_s"]
        for p in bench["points"]
        if p["server"] == "noop" and p["count"] == 1 and p["concurrency"] >= 8
    ]
    assert pipeline64 is not None and 2 * t64["images_per_s"] < pipeline64
    twice = 2 * t1["requests_per_s"]
    where = (
        "below" if twice < min(noop) else "above" if twice > max(noop) else "within the range of"
    )
    quoted(
        prose,
        f"twice Triton's {t64['images_per_s']:,.0f} images/s is {2 * t64['images_per_s']:,.0f}; "
        f"the in-process Sample pipeline runs {pipeline64:,.0f} at batch 64",
        f"the int8 service serves {int8_64:,.0f} at that point",
        f"twice Triton's {t1['requests_per_s']:,.0f} is {twice:,.0f} requests/s, {where} the "
        f"no-op Python gRPC server ({min(noop):,.0f} to {max(noop):,.0f} at 8 or more in flight)",
    )


def test_the_reliability_prose_quotes_its_duration(prose: str) -> None:
    seconds = sum(s["wall_seconds"] for s in load("reliability.json")["scenarios"].values())
    quoted(prose, f"(its scenarios took {seconds:.0f} s together in the run below)")
    makefile = re.sub(r"\s+", " ", (ROOT / "Makefile").read_text().replace("#", " "))
    assert f"its scenarios took {seconds:.0f} s together" in makefile


def test_the_size_limit_prose_quotes_the_campaign(prose: str) -> None:
    limits = load("reliability.json")["scenarios"]["limits"]
    many = limits["concurrent_large_messages"]
    quoted(
        prose,
        f"in the campaign, {many['at_once']} messages of {many['message_mb']:g} MB at once raised "
        f"the peak RSS by {limits['peak_over_before_mb']:.0f} MB",
    )
    growth = limits["peak_over_before_mb"] / (many["at_once"] * many["message_mb"])
    assert 1.5 <= growth <= 2.5  # "times twice their size"


def test_the_quality_figures_are_quality_json(prose: str) -> None:
    q = load("quality.json")
    m, t = q["metrics"], q["training"]
    quoted(
        prose,
        f"evaluated {q['evaluated_at'][:10]}",
        f"| test -log p(x), IWAE bound, k={m['iw_k']:.0f} | **{m['iw_nll']:.2f} ± "
        f"{m['iw_nll_stderr']:.2f}**",
        f"| test negative ELBO | {m['negative_elbo']:.2f} (reconstruction "
        f"{m['reconstruction']:.2f} + KL {m['kl']:.2f}); the k={m['iw_k']:.0f} bound is "
        f"{m['negative_elbo'] - m['iw_nll']:.1f} nats tighter |",
        f"| active latent units | {m['active_units']:.0f} of {q['config']['latent_size']} |",
        f"| best validation negative ELBO | {t['best_validation_negative_elbo']:.2f} at epoch "
        f"{t['best_epoch']}",
        f"| training time | {t['training_seconds']:,.0f} s ({t['training_seconds'] / 60:.0f} "
        f"min) on this shared host: median {t['seconds_per_epoch']:.2f} s an epoch |",
        f"| evaluation, k={m['iw_k']:.0f} on {m['test_images']:,.0f} test digits | "
        f"{m['evaluation_seconds']:.0f} s with {q['machine']['torch_threads']} threads |",
        f"(83 minutes at a median {t['seconds_per_epoch']:.2f} s an epoch",
    )
    assert t["training_seconds"] / 60 == pytest.approx(83, abs=0.5)


def test_the_default_model_figures_are_its_results_file(prose: str) -> None:
    d = load("default_model.json")
    m, t = d["metrics"], d["training"]
    quoted(
        prose,
        f"({t['training_seconds']:.0f} s of training, one torch thread",
        f"best validation negative ELBO {t['best_validation_negative_elbo']:.2f} at epoch "
        f"{t['best_epoch']}; on the {m['test_images']:.0f} test digits, negative ELBO "
        f"{m['negative_elbo']:.2f} (reconstruction {m['reconstruction']:.2f} + KL {m['kl']:.2f}), "
        f"{m['active_units']:.0f} of 32 latent units active, -log p(x) {m['iw_nll']:.2f} ± "
        f"{m['iw_nll_stderr']:.2f} with k={m['iw_k']:.0f}",
        f"Training (one torch thread) took {t['training_seconds']:.0f} s, a median "
        f"{t['seconds_per_epoch']:.2f} s an epoch, in the recorded run (commit "
        f"{d['git_commit'][:7]}",
    )
    assert t["settings"]["threads"] == 1


def test_no_prose_figure_outlives_its_file(readme: str) -> None:
    """Figures the README once quoted without a results file behind them stay out of its prose
    (a generated table may meet one of them by chance)."""
    words = re.sub(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", "", readme, flags=re.S)
    for gone in ("1,772", "3,041", "0.90 in a morning", "72,108", "3,559", "71,380", "9,255"):
        assert gone not in words, gone


def test_deploy_readme_memory_figures_are_the_results_files() -> None:
    text = re.sub(r"\s+", " ", (ROOT / "deploy" / "README.md").read_text())
    rss = load("bench.json")["servers"]["service"]["rss_mb"]
    image = load("image.json")
    memory = next(v for v in image.values() if isinstance(v, dict) and "VmHWM" in v)
    campaign = load("reliability.json")["scenarios"]
    quoted(
        text,
        f"{rss['idle']:.0f} MB idle and a peak of {rss['peak']:.0f} MB over the whole `make "
        "bench` run",
        f"{memory['VmHWM'] / 1e6:.0f} MB in the container after 20 × `Sample(1024)`",
        f"{campaign['overload']['rss_mb_peak']:.0f} MB at the peak of an overload at "
        f"{campaign['overload']['factor']:g} times capacity",
        f"{campaign['limits']['rss_mb_peak']:.0f} MB when "
        f"{campaign['limits']['concurrent_large_messages']['at_once']} callers at once sent "
        f"{campaign['limits']['concurrent_large_messages']['message_mb']:g} MB requests, "
        f"{campaign['limits']['concurrent_large_messages']['rounds']} times over",
    )


def test_the_hot_path_figures_are_hot_path_json(prose: str) -> None:
    hot = load("hot_path.json")
    reply, serialized = hot["reply_1024_float32_ms"], hot["reply_1024_float32_serialized_ms"]
    allocator = (
        f"took {serialized['glibc_default']:.1f} ms instead of "
        f"{serialized['malloc_thresholds']:.2f} ms"
    )
    quoted(
        prose,
        f"{hot['png_encode_us_per_image']:.0f} us an image to encode",
        f"that cost {reply['constructor_extra']:.2f} ms more a call",
        allocator,
    )
    assert prose.count(allocator) == 2


def test_the_exploration_figures_are_make_explores_summary(readme: str, prose: str) -> None:
    """README's latent-space prose and score table against docs/explore/summary.txt, the log
    `make explore` writes beside the pictures."""
    summary = (ROOT / "docs" / "explore" / "summary.txt").read_text()
    linear = re.search(r"latent norm ([\d.]+) -> ([\d.]+), from ([\d.]+) to ([\d.]+)", summary)
    assert linear is not None
    start, end, low, _ = (float(x) for x in linear.groups())
    ink = {
        float(row[0]): (float(row[1]), float(row[2]))
        for row in re.findall(r"^\s+([+-][\d.]+)\s+([\d.]+)\s+([+-][\d.]+)$", summary, re.M)[:6]
    }
    steps = [float(x) for x in re.findall(r"^z\[\d+\]\s+[+-][\d.]+\s+([\d.]+)$", summary, re.M)]
    quoted(
        prose,
        f"|z| from {start:.1f} down to {low:.1f} and back up to {end:.1f}",
        f"between the endpoints' ({end:.1f} to {start:.1f})",
        "(996 each)" if "(996 images); group B: thin strokes (996 images)" in summary else "?",
        f"mean grey level {ink[-1.0][0]:.1f} at strength -1, {ink[0.0][0]:.1f} at 0, "
        f"{ink[1.5][0]:.1f} at +1.5",
        f"finds {ink[1.0][1]:.2f} of the vector still there at strength 1",
        f"({min(steps):.3f} to {max(steps):.3f} for these rows",
    )
    table = re.search(r"^threshold: .*?(?=^\d+ of \d+ above the threshold$)", summary, re.M | re.S)
    assert table is not None
    for line in table.group(0).splitlines():  # the README shows it as a code block
        assert f"    {line}\n" in readme, f"the README's score table lacks: {line!r}"


def test_deploy_readme_image_table_is_image_json() -> None:
    """The table `make image-test`'s figures fill in deploy/README.md (the CI run rewrites
    image.json after the tests; a committed change must bring the table along)."""
    text = (ROOT / "deploy" / "README.md").read_text()
    image = load("image.json")
    memory = image["memory_after_20_sample_1024"]
    starts = " / ".join(f"{s:.2f}" for s in image["start_to_serving_seconds"])
    stop = image["stop_under_load"]
    for row in (
        f"| image `{image['image']}` (CPU, model baked, {image['python']}) | "
        f"{image['image_bytes'] / 1e6:.0f} MB |",
        f"| `podman run` to SERVING (3 starts) | {starts} s |",
        f"(VmRSS / VmHWM) | {memory['VmRSS'] / 1e6:.0f} / {memory['VmHWM'] / 1e6:.0f} MB |",
        f"| `podman stop` with {stop['in_flight_at_sigterm']} calls in flight",
        f"| {stop['stop_seconds']:.2f} s, exit 0 |",
    ):
        assert row in text, f"deploy/README.md does not say: {row!r}"


def side_by_side(name: str, config: str, concurrency: int) -> tuple[str, str]:
    """(ratio to the first configuration, p99 ms) as `bench.serve_ab` printed them in its table,
    for `config` at `concurrency` in flight."""
    line = next(
        row for row in load(name)["table"] if row.startswith(f"x{concurrency:<3} {config} ")
    )
    ratio, p99 = re.search(r"/ \S+: ([\d.]+)", line), re.search(r"p99\s+([\d.]+) ms", line)
    assert ratio is not None and p99 is not None, line
    return ratio.group(1), p99.group(1)


def test_the_hardening_cost_is_its_side_by_side_runs(prose: str) -> None:
    one = side_by_side("hardening_ab_count1.json", "now", 1)[0]
    many = side_by_side("hardening_ab_count1.json", "now", 32)[0]
    quoted(
        prose,
        f"answers {one} as many Sample(1) calls a second at 1 in flight, {many} at 32 in flight "
        f"and {side_by_side('hardening_ab_count64.json', 'now', 8)[0]} as many Sample(64) at 8",
    )


def test_the_precision_figures_are_their_side_by_side_runs(prose: str) -> None:
    big, big_p99 = side_by_side("precision_ab_count1024.json", "int8", 8)
    small, small_p99 = side_by_side("precision_ab_count64.json", "int8", 8)
    quoted(
        prose,
        f"int8 answers {big} times as many Sample(1024, uint8) calls as fp32 at 8 in flight (p99 "
        f"{big_p99} ms against {side_by_side('precision_ab_count1024.json', 'fp32', 8)[1]} ms)",
        f"and {small} times as many Sample(64, uint8) (p99 {small_p99} ms against "
        f"{side_by_side('precision_ab_count64.json', 'fp32', 8)[1]} ms)",
    )


def test_the_precision_prose_quotes_bench_json(prose: str, bench: dict[str, Any]) -> None:
    goal = {g["goal"].split(",")[0]: g for g in bench["goals"] if "int8 served" in g["goal"]}
    fp32 = {p["batch"]: p["images_per_s"] for p in bench["limit"]["onnxruntime"]["points"]}
    int8 = {p["batch"]: p["images_per_s"] for p in bench["limit_int8"]["onnxruntime"]["points"]}
    gains = [int8[n] / fp32[n] for n in int8]
    quoted(
        prose,
        f"the int8 decoder session runs {min(gains):.1f} to {max(gains):.1f} times fp32's",
        f"int8 Sample(1024, uint8) reaches {goal['Sample(1024']['measured']:.2f} and "
        f"Sample(64, uint8) {goal['Sample(64']['measured']:.2f} of fp32's in-process session",
        f"the int8 server ended the run at {bench['servers']['int8']['rss_mb_end']:.0f} MB RSS",
        f"reaches {goal['Sample(1024']['measured']:.2f} of the fp32 session (issue 14's goal",
        f"With int8 it is {goal['Sample(64']['measured']:.2f} of the fp32 session",
    )


def test_the_int8_peers_table_is_its_runs(prose: str) -> None:
    """The peers on the int8 graph against our int8 service measured right after them."""
    peers = load("peers_int8.json")
    assert peers["precision"] == "int8"

    def theirs(name: str, count: int, concurrency: int) -> dict[str, Any]:
        return next(
            p
            for p in peers["peers"][name]["points"]
            if (p["count"], p["concurrency"]) == (count, concurrency)
        )

    def ours(count: int, concurrency: int) -> tuple[float, float]:
        runs = [
            p
            for p in load(f"peers_int8_ours_count{count}.json")["points"]
            if p["server"] == "int8" and p["concurrency"] == concurrency
        ]
        key = "images_per_s" if count > 1 else "requests_per_s"
        rates = sorted(p[key] for p in runs)
        p99s = sorted(p["latency_ms"]["p99"] for p in runs)
        return sum(rates) / len(rates), sum(p99s) / len(p99s)  # the median of 2 rounds

    for count, concurrency in ((64, 8), (64, 32), (1, 32)):
        rate, p99 = ours(count, concurrency)
        triton, mlserver = (
            theirs("triton", count, concurrency),
            theirs("mlserver", count, concurrency),
        )
        key = "images_per_s" if count > 1 else "requests_per_s"
        unit = "images/s" if count > 1 else "requests/s"
        quoted(
            prose,
            f"| Sample({count}) x{concurrency} | {rate:,.0f} {unit}, p99 {p99:.1f} ms | "
            f"{triton[key]:,.0f}, p99 {triton['latency_ms']['p99']:.1f} ms | "
            f"{rate / triton[key]:.2f}x | {mlserver[key]:,.0f}, p99 "
            f"{mlserver['latency_ms']['p99']:.1f} ms | {rate / mlserver[key]:.2f}x |",
        )
        assert p99 < triton["latency_ms"]["p99"] and p99 < mlserver["latency_ms"]["p99"]
