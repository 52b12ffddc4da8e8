"""`vae-loadtest`: drive any VaeService RPC at a concurrency or a rate, report throughput and
latency from an HDR histogram.

    vae-loadtest --target localhost:50051 --method sample --count 64 --format uint8 \\
        --concurrency 32 --duration 10 --warmup 2
    vae-loadtest --target dns:///vae.default.svc:50051 --connections 4 --rate 2000 \\
        --arrivals poisson --requests 20000 --json
    vae-loadtest --target localhost:50051 --sweep 1,2,4,8,16,32,64 --plot sweep.png

Closed loop (`--concurrency N`): N callers, each sending its next request when the last one
returns; latency is measured from the send. Open loop (`--rate R`): requests are sent on a
schedule (constant spacing or Poisson arrivals) whatever the replies do, and latency is measured
from the *scheduled* send time, so a server (or client) that falls behind shows its queue in the
latencies instead of hiding it (coordinated omission). Requests sent during `--warmup` are not
measured. Latencies are those of successful calls; failed calls are counted by status code.

Requests are built once with the generated messages and sent pre-serialized, and replies are
not parsed, so the generator spends its CPU on gRPC itself; pin it to other cores than the
server's (`taskset`) to keep the two apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc

SERVICE = "/vae.v1.VaeService/"
METHODS = {"sample": "Sample", "decode": "Decode", "encode": "Encode", "info": "GetModelInfo"}
FORMATS = {
    "probabilities": vae_pb2.IMAGE_FORMAT_PROBABILITIES,
    "uint8": vae_pb2.IMAGE_FORMAT_UINT8,
    "binary": vae_pb2.IMAGE_FORMAT_BINARY,
    "png": vae_pb2.IMAGE_FORMAT_PNG,
}
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
PAYLOAD_VARIANTS = 4  # distinct decode/encode requests, sent in turn
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
HISTOGRAM_MAX_US = 3_600_000_000  # one hour, in microseconds


@dataclass(frozen=True)
class LoadConfig:
    targets: tuple[str, ...]
    method: str = "sample"
    count: int = 1
    image_format: str = "uint8"
    concurrency: int = 1  # closed loop (when rate is None)
    rate: float | None = None  # open loop: requests per second
    arrivals: str = "constant"  # or "poisson"
    duration: float | None = 10.0  # measured seconds (after warm-up), if requests is None
    requests: int | None = None  # measured requests
    warmup: float = 1.0
    connections: int = 1
    timeout: float = 30.0  # per-call deadline, seconds
    samples_per_image: int = 0  # encode only
    latent_size: int | None = None  # decode: None asks GetModelInfo
    seed: int = 0

    @property
    def mode(self) -> str:
        return "closed" if self.rate is None else "open"


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


# -- channels and requests ----------------------------------------------------------------------


def make_channels(targets: tuple[str, ...], connections: int) -> list[grpc.aio.Channel]:
    """`connections` channels (at least one per target), each with its own TCP connection(s);
    a `dns:///` target spreads its calls over every address the name resolves to."""
    channels = []
    for k in range(max(connections, len(targets))):
        target = targets[k % len(targets)]
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Channels to one target share connections unless each has its own pool.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if target.startswith("dns:"):
            options.append(("grpc.lb_policy_name", "round_robin"))
        channels.append(grpc.aio.insecure_channel(target, options=options))
    return channels


async def model_info(channel: grpc.aio.Channel, timeout: float) -> vae_pb2.ModelInfo:
    stub = vae_pb2_grpc.VaeServiceStub(channel)
    return await stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=timeout)  # type: ignore[no-any-return]


def real_digits(count: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """`count` uint8 [count, 784] MNIST digits from the embedded 5k set, else random images."""
    try:
        from vae_data import mnist

        images = mnist.read_embedded(mnist.embedded_path()).images
        picked = images[rng.integers(0, len(images), count)]
        return np.ascontiguousarray(picked, np.uint8), "mnist (embedded 5k digits)"
    except (ImportError, AttributeError, OSError, ValueError) as exc:
        noise = rng.integers(0, 256, (count, 784), dtype=np.uint8)
        return noise, f"random images: real digits unavailable ({exc})"


def _tensor(array: np.ndarray, dtype: vae_pb2.DataType.ValueType) -> vae_pb2.Tensor:
    return vae_pb2.Tensor(shape=array.shape, dtype=dtype, data=array.tobytes())


def build_payloads(config: LoadConfig, latent_size: int | None) -> tuple[list[bytes], list[str]]:
    """Serialized requests for `config.method`, and notes on where their data came from.

    For encode, `--format` picks how the images travel: probabilities (float32 in [0, 1]),
    uint8 (0-255), binary (uint8 0/1) or png."""
    rng = np.random.default_rng(config.seed)
    fmt = FORMATS[config.image_format]
    notes: list[str] = []
    message: Any
    if config.method == "info":
        return [vae_pb2.GetModelInfoRequest().SerializeToString()], notes
    if config.method == "sample":
        message = vae_pb2.SampleRequest(count=config.count, format=fmt)
        return [message.SerializeToString()], notes
    payloads = []
    for _ in range(PAYLOAD_VARIANTS):
        if config.method == "decode":
            assert latent_size is not None
            latents = rng.standard_normal((config.count, latent_size), dtype=np.float32)
            message = vae_pb2.DecodeRequest(
                latents=_tensor(latents, vae_pb2.DATA_TYPE_FLOAT32), format=fmt
            )
        elif config.method == "encode":
            digits, source = real_digits(config.count, rng)
            if not notes:
                notes.append(f"encode images: {source}")
            message = vae_pb2.EncodeRequest(
                images=_image_input(digits, config.image_format),
                samples_per_image=config.samples_per_image,
            )
        else:
            raise ValueError(f"unknown method {config.method!r}")
        payloads.append(message.SerializeToString())
    return payloads, notes


def _image_input(digits: np.ndarray, image_format: str) -> vae_pb2.ImageInput:
    if image_format == "png":
        import io

        from PIL import Image

        pngs = []
        for image in digits.reshape(-1, 28, 28):
            buffer = io.BytesIO()
            Image.fromarray(image, mode="L").save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        return vae_pb2.ImageInput(png=vae_pb2.PngImages(images=pngs))
    if image_format == "probabilities":
        return vae_pb2.ImageInput(
            tensor=_tensor(digits.astype(np.float32) / 255, vae_pb2.DATA_TYPE_FLOAT32)
        )
    if image_format == "binary":
        digits = (digits >= 128).astype(np.uint8)
    return vae_pb2.ImageInput(tensor=_tensor(digits, vae_pb2.DATA_TYPE_UINT8))


# -- the load -----------------------------------------------------------------------------------

RawCall = Callable[..., Any]  # grpc.aio.UnaryUnaryMultiCallable on bytes


class _Run:
    """What one load run counts: a histogram, errors, completion times."""

    def __init__(self, config: LoadConfig, calls: list[RawCall], payloads: list[bytes]) -> None:
        self.config = config
        self.calls = calls
        self.payloads = payloads
        self.histogram = HdrHistogram(1, HISTOGRAM_MAX_US, 3)
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.last_done = 0.0
        self.send_lag_max = 0.0
        self.sent = 0
        start = time.perf_counter()
        self.measure_start = start + config.warmup
        self.measure_end = (
            self.measure_start + config.duration if config.duration is not None else math.inf
        )
        self.to_measure = config.requests if config.requests is not None else math.inf

    def admit(self, at: float) -> bool | None:
        """Whether a request sent (or scheduled) at `at` is measured; None: stop sending."""
        if at < self.measure_start:
            return False
        if at >= self.measure_end or self.to_measure <= 0:
            return None
        self.to_measure -= 1
        return True

    async def call(self, measured: bool, start: float) -> None:
        """One call; its latency counts from `start` (the send, or the scheduled send)."""
        i = self.sent
        self.sent += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.calls[i % len(self.calls)](
                self.payloads[i % len(self.payloads)], timeout=self.config.timeout
            )
            code = None
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            if code not in self.error_examples:
                self.error_examples[code] = (exc.details() or "")[:200]
        finally:
            self.in_flight -= 1
        done = time.perf_counter()
        if not measured:
            return
        self.last_done = max(self.last_done, done)
        if code is None:
            self.ok += 1
            self.histogram.record_value(max(1, round((done - start) * 1e6)))
        else:
            self.errors[code] += 1

    async def closed_loop(self) -> None:
        async def caller() -> None:
            while True:
                start = time.perf_counter()
                measured = self.admit(start)
                if measured is None:
                    return
                await self.call(measured, start)

        await asyncio.gather(*(caller() for _ in range(self.config.concurrency)))

    async def open_loop(self) -> None:
        assert self.config.rate is not None
        rate = self.config.rate
        rng = np.random.default_rng(self.config.seed)
        pending: set[asyncio.Task[None]] = set()
        origin = time.perf_counter()
        scheduled = origin
        i = 0
        while True:
            if self.config.arrivals == "poisson":
                scheduled += rng.exponential(1 / rate)
            else:
                scheduled = origin + i / rate
            i += 1
            measured = self.admit(scheduled)
            if measured is None:
                break
            wait = scheduled - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                self.send_lag_max = max(self.send_lag_max, -wait)
                if i % 64 == 0:
                    await asyncio.sleep(0)  # behind schedule: let replies in now and then
            task = asyncio.create_task(self.call(measured, scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    def report(self, cpu_seconds: float, wall_seconds: float, notes: list[str]) -> Report:
        elapsed = max(self.last_done - self.measure_start, 1e-9) if self.last_done else 0.0
        h = self.histogram
        latency = {}
        if self.ok:
            latency = {f"p{p:g}": h.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
            latency["max"] = h.get_max_value() / 1000
            latency["mean"] = h.get_mean_value() / 1000
        config = asdict(self.config)
        config["mode"] = self.config.mode
        return Report(
            config=config,
            ok=self.ok,
            errors=dict(self.errors),
            error_examples=self.error_examples,
            elapsed_s=elapsed,
            requests_per_s=self.ok / elapsed if elapsed else 0.0,
            images_per_s=self.ok * _images_per_call(self.config) / elapsed if elapsed else 0.0,
            latency_ms=latency,
            client_cpu_percent=100 * cpu_seconds / wall_seconds if wall_seconds else 0.0,
            send_lag_ms_max=self.send_lag_max * 1000,
            max_in_flight=self.max_in_flight,
            notes=notes,
        )


def _images_per_call(config: LoadConfig) -> int:
    return 0 if config.method == "info" else config.count


async def run_load(
    config: LoadConfig, channels: list[grpc.aio.Channel], payloads: list[bytes], notes: list[str]
) -> Report:
    """One closed- or open-loop run over `channels`, warm-up first."""
    path = SERVICE + METHODS[config.method]
    calls: list[RawCall] = [  # no (de)serializers: bytes in, bytes out
        channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        for channel in channels
    ]
    cpu, wall = time.process_time(), time.perf_counter()
    run = _Run(config, calls, payloads)
    await (run.closed_loop() if config.mode == "closed" else run.open_loop())
    return run.report(time.process_time() - cpu, time.perf_counter() - wall, notes)


async def run_all(config: LoadConfig, sweep: list[float] | None = None) -> list[Report]:
    """Run `config`, or one run per sweep value (a concurrency, or a rate in open loop), over
    the same channels."""
    channels = make_channels(config.targets, config.connections)
    try:
        latent_size = config.latent_size
        if config.method == "decode" and latent_size is None:
            latent_size = (await model_info(channels[0], config.timeout)).latent_size
        payloads, notes = build_payloads(config, latent_size)
        reports = []
        steps: list[float | None] = list(sweep) if sweep else [None]
        for value in steps:
            step = config
            if value is not None:
                if config.mode == "open":
                    step = replace(config, rate=float(value))
                else:
                    step = replace(config, concurrency=int(value))
            reports.append(await run_load(step, channels, payloads, notes))
        return reports
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels))


# -- output -------------------------------------------------------------------------------------


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


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vae-loadtest",
        description="Load-test a VaeService: throughput and HDR latency percentiles.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--target",
        action="append",
        help="host:port or dns:///host:port (round-robin over its addresses); repeatable "
        "(default localhost:50051)",
    )
    p.add_argument("--method", choices=sorted(METHODS), default="sample")
    p.add_argument("--count", type=int, default=1, help="images (or latents) per request")
    p.add_argument(
        "--format",
        dest="image_format",
        choices=sorted(FORMATS),
        default="uint8",
        help="reply images for sample/decode; how the images travel for encode",
    )
    p.add_argument("--samples-per-image", type=int, default=0, help="encode: z draws per image")
    p.add_argument("--latent-size", type=int, help="decode: skip asking GetModelInfo")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=1, help="closed loop: calls in flight")
    load.add_argument("--rate", type=float, help="open loop: requests per second")
    p.add_argument("--arrivals", choices=["constant", "poisson"], default="constant")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--requests", type=int, help="measured requests (instead of --duration)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    p.add_argument("--connections", type=int, default=1, help="channels (TCP connections)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-call deadline, seconds")
    p.add_argument("--seed", type=int, default=0, help="for request data and Poisson arrivals")
    p.add_argument(
        "--sweep",
        help="comma-separated concurrencies (or rates, with --rate) to run one after another",
    )
    p.add_argument("--plot", help="PNG of throughput against p99 latency over the sweep")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = p.parse_args(argv)
    for name in ("count", "concurrency", "connections", "requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be > 0")
    if args.duration <= 0 or args.warmup < 0 or args.timeout <= 0:
        p.error("--duration and --timeout must be > 0, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = LoadConfig(
        targets=tuple(args.target or ["localhost:50051"]),
        method=args.method,
        count=args.count,
        image_format=args.image_format,
        concurrency=args.concurrency,
        rate=args.rate,
        arrivals=args.arrivals,
        duration=None if args.requests else args.duration,
        requests=args.requests,
        warmup=args.warmup,
        connections=args.connections,
        timeout=args.timeout,
        samples_per_image=args.samples_per_image,
        latent_size=args.latent_size,
        seed=args.seed,
    )
    sweep = [float(v) for v in args.sweep.split(",")] if args.sweep else None
    try:
        reports = _run(run_all(config, sweep), args.loop)
    except grpc.aio.AioRpcError as exc:  # GetModelInfo failed
        message = f"cannot get the model info: {exc.code().name}: {exc.details()}"
        print(message, file=sys.stderr)
        if args.json:
            print(json.dumps({"error": message}))
        return 2
    if args.plot:
        plot_sweep(reports, args.plot)
    if args.json:
        out: dict[str, Any] = (
            reports[0].to_dict() if sweep is None else {"sweep": [r.to_dict() for r in reports]}
        )
        if args.plot:
            out["plot"] = args.plot
        print(json.dumps(out))
    else:
        print("\n\n".join(format_report(r) for r in reports))
        if args.plot:
            print(f"\nplot: {args.plot}")
    return 0 if any(r.ok for r in reports) else 1


def _run(coroutine: Coroutine[Any, Any, list[Report]], loop: str) -> list[Report]:
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            print("uvloop not installed: using asyncio's loop", file=sys.stderr)
        else:
            return uvloop.run(coroutine)  # type: ignore[no-any-return]
    return asyncio.run(coroutine)


if __name__ == "__main__":
    raise SystemExit(main())
