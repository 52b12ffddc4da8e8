"""The costs README's "The hot path" quotes, measured in process: `make bench-hot-path` writes
bench/results/hot_path.json.

- PNG: `codec.images_into` for PNG output, per image (the reason PNG is for small counts);
- a reply of 1024 float32 images built in place (`images_into` on the reply's own field) against
  handing a built ImageOutput to the SampleResponse constructor, which copies it whole;
- building and serializing that reply with glibc's default allocator and with the thresholds the
  Makefile and the images set (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`), each in a
  fresh process, since glibc reads them at start.

Each figure is the median of `--rounds` rounds of `--seconds` each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.machine import cpu, git_commit
from bench.servers import MALLOC_ENV
from service import codec
from service.proto.vae.v1 import vae_pb2

RESULTS = Path(__file__).resolve().parent / "results" / "hot_path.json"


def per_call(fn: Callable[[], object], seconds: float, rounds: int) -> float:
    """Median over rounds of the seconds one call of `fn` takes."""
    medians = []
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            fn()
            calls += 1
        medians.append(elapsed / calls)
    return statistics.median(medians)


def probabilities(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 784), dtype=np.float32)


def reply_in_place(p: np.ndarray) -> bytes:
    response = vae_pb2.SampleResponse(seed=1)
    codec.images_into(response.images, p, vae_pb2.IMAGE_FORMAT_PROBABILITIES, 1)
    return response.SerializeToString()


def reply_by_constructor(p: np.ndarray) -> bytes:
    images = vae_pb2.ImageOutput()
    codec.images_into(images, p, vae_pb2.IMAGE_FORMAT_PROBABILITIES, 1)
    return vae_pb2.SampleResponse(seed=1, images=images).SerializeToString()


def allocator_child(seconds: float, rounds: int) -> None:
    """In a child process: ms to build and serialize one 1024-image float32 reply."""
    p = probabilities(1024)
    print(json.dumps(per_call(lambda: reply_in_place(p), seconds, rounds) * 1e3))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--allocator-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allocator_child:
        allocator_child(args.seconds, args.rounds)
        return

    small = probabilities(64)
    png = per_call(
        lambda: codec.images_into(vae_pb2.ImageOutput(), small, vae_pb2.IMAGE_FORMAT_PNG, 1),
        args.seconds,
        args.rounds,
    )
    big = probabilities(1024)
    in_place = per_call(lambda: reply_in_place(big), args.seconds, args.rounds)
    constructor = per_call(lambda: reply_by_constructor(big), args.seconds, args.rounds)

    def child(env: dict[str, str]) -> float:
        command = [sys.executable, "-m", "bench.hot_path", "--allocator-child"]
        command += ["--seconds", str(args.seconds), "--rounds", str(args.rounds)]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return float(json.loads(out.stdout))

    plain = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    results = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "cpu": cpu(),
        "command": "make bench-hot-path",
        "png_encode_us_per_image": round(png / len(small) * 1e6, 1),
        "reply_1024_float32_ms": {
            "in_place": round(in_place * 1e3, 3),
            "constructor": round(constructor * 1e3, 3),
            "constructor_extra": round((constructor - in_place) * 1e3, 3),
        },
        "reply_1024_float32_serialized_ms": {
            "glibc_default": round(child(plain), 3),
            "malloc_thresholds": round(child({**plain, **MALLOC_ENV}), 3),
        },
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
