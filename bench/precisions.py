"""`make bench`'s precision section: the int8 variant served beside fp32, the same points back
to back on the same core, and each precision's decoder in process (ONNX Runtime alone, as the
limit). Skipped, with the reason, for a version without the variant.

Every figure here is of one `make bench` run: the served ones against fp32's in-process limit
(issue 14's goals: Sample(1024, uint8) at 1.2x and Sample(64, uint8) at 0.8x of it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.goals import limit_rate, number, p99, precision_served

PRECISION = "int8"  # the variant measured beside fp32 (fp16 is for CUDA: no GPU here)
SIZES = (64, 1024)
POINTS = tuple(("sample", count, "uint8", c) for count in SIZES for c in (8, 32))
REPEATS = 2  # fp32, int8, fp32, int8 at each point: a passing blip spoils one only
LIMIT = f"limit_{PRECISION}"  # bench.json's key for the variant's in-process figures
LIMIT_FLAGS = ("--only-onnxruntime", "--precision", PRECISION, "--sizes", "64,1024")


def available(manifest: dict[str, Any]) -> bool:
    return PRECISION in manifest.get("variants", {})


def measure(
    run_point: Callable[[Any, tuple[str, int, str, int]], dict[str, Any]],
    fp32: Any,
    variant: Any,
) -> list[dict[str, Any]]:
    """Each point on the fp32 server, then on the variant's, REPEATS times."""
    points = []
    for load in POINTS:
        for repeat in range(REPEATS):
            for server in (fp32, variant):
                measured = run_point(server, load)
                measured.update(section="precision", repeat=repeat)
                points.append(measured)
    return points


def table(results: dict[str, Any]) -> str:
    """Per precision: the decoder in process, and served Sample(uint8) (the best over the
    section's concurrencies), each size's ratio to fp32 in process."""
    if "precision_skipped" in results:
        return results["precision_skipped"]
    header = ["precision", "server"]
    for n in SIZES:
        header += [f"in process, batch {n}", f"Sample({n}, uint8)", "p99 ms", "/ fp32 in process"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for precision, server in (("fp32", "service"), (PRECISION, PRECISION)):
        row = [precision, f"`{server}`"]
        for n in SIZES:
            own = limit_rate(results, n, limit=LIMIT if precision == PRECISION else "")
            served = precision_served(results, server, n)
            fp32 = limit_rate(results, n)
            rate = served["images_per_s"] if served else None
            row += [
                number(own),
                f"{number(rate)} (x{served['concurrency']})" if served else "-",
                f"{p99(served):.2f}",
                f"{rate / fp32:.2f}" if rate and fp32 else "-",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
