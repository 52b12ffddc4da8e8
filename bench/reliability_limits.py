"""The request limits under a hostile caller (bench/reliability.py `limits`): what one caller can
make the server hold in memory with messages above max_message_bytes, and with many large ones
at once.

A message above `max_message_bytes` is refused RESOURCE_EXHAUSTED by gRPC itself, before any of
our code runs; one below it but above `max_items_per_request` is parsed and refused
INVALID_ARGUMENT. Either way the bytes are freed when the call is answered, so what a caller can
make the server hold is about (its messages in flight) x (message size, twice: the bytes and the
parsed message): `max_message_bytes` is the knob. The allocator keeps what it freed for reuse,
so the same burst again adds little; with the Makefile's MALLOC_TRIM_THRESHOLD_ above glibc's
64 MB arena heaps, freed memory stays with the process (see the README).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from bench.hostile_input import raw_caller, status_of
from bench.load_drivers import MB, RssSampler, health_ok, mb
from bench.servers import ServerProcess
from service.proto.vae.v1 import vae_pb2
from service.settings import Settings

SEND_LIMIT = 256 * MB  # this client sends more than the server accepts


def _decode_of(size: int, latent: int) -> bytes:
    """A serialized Decode request of about `size` bytes of float32 latents."""
    rows = size // (4 * latent)
    tensor = vae_pb2.Tensor(
        shape=[rows, latent], dtype=vae_pb2.DATA_TYPE_FLOAT32, data=bytes(4 * latent * rows)
    )
    return vae_pb2.DecodeRequest(latents=tensor).SerializeToString()


def request_limits(
    repo: Path, model: str, oversized: int = 30, concurrent: int = 8, rounds: int = 5
) -> dict[str, Any]:
    limit = Settings.model_fields["max_message_bytes"].default
    options = [("grpc.max_send_message_length", SEND_LIMIT)]
    with ServerProcess.start(repo, model).wait_serving() as server:
        channel = grpc.insecure_channel(server.target, options=options)
        decode = raw_caller(channel, "Decode")
        status_of(decode, _decode_of(MB, 32))  # the first large message: buffers settle
        time.sleep(0.5)
        rss = RssSampler(server, interval=0.02)
        rss_before = server.rss_bytes()

        too_big = _decode_of(limit + 4 * MB, 32)
        refused, after_oversized = [], []
        for _ in range(3):  # one at a time: what is kept after each batch of them
            refused += [status_of(decode, too_big) for _ in range(oversized // 3)]
            time.sleep(0.5)
            after_oversized.append(server.rss_bytes())

        many_rows = _decode_of(limit // 2, 32)  # fits the message limit, not the item limit
        answers: list[tuple[grpc.StatusCode, str]] = []
        after_rounds: list[int] = []
        for _ in range(rounds):  # the same again: retained memory is reused, not added to
            with ThreadPoolExecutor(concurrent) as pool:
                answers += pool.map(lambda _: status_of(decode, many_rows), range(concurrent))
            time.sleep(0.5)
            after_rounds.append(server.rss_bytes())
        samples = rss.stop()
        rss_end = server.rss_bytes()
        alive = health_ok(server.target)
        channel.close()
    peak = max(r for _, r in samples)
    return {
        "max_message_bytes": limit,
        "oversized_messages": {
            "sent": len(refused),
            "message_mb": mb(len(too_big)),
            "codes": sorted({code.name for code, _ in refused}),
            "details": refused[0][1][:120],
        },
        "concurrent_large_messages": {
            "at_once": concurrent,
            "rounds": rounds,
            "message_mb": mb(len(many_rows)),
            "codes": sorted({code.name for code, _ in answers}),
            "details": answers[0][1][:120],
        },
        "rss_mb_before": mb(rss_before),
        "rss_mb_after_each_third_of_the_oversized": [mb(r) for r in after_oversized],
        "rss_mb_peak": mb(peak),
        "rss_mb_after_each_round": [mb(r) for r in after_rounds],
        "rss_mb_end": mb(rss_end),
        "peak_over_before_mb": mb(peak - rss_before),
        "server_alive_after": alive,
        "passed": alive
        and {code.name for code, _ in refused} == {"RESOURCE_EXHAUSTED"}
        and {code.name for code, _ in answers} == {"INVALID_ARGUMENT"},
    }
