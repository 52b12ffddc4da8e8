"""Locust load test for vae-serve over gRPC, for teams that already drive their load with Locust.

    pip install locust
    locust -f bench/locustfile.py --host localhost:50051 --headless -u 32 -r 32 -t 30s \\
        --vae-method sample --vae-count 64 --vae-format uint8

Each simulated user sends the next call as soon as the last returns (a closed loop, like
`vae-loadtest --concurrency`). Requests are the ones `vae-loadtest` builds (decode: random
latents of the served latent size; encode: real digits), pre-serialized; replies are not
parsed. Locust reports response times in milliseconds per method. Its gevent users cost more
client CPU a call than `vae-loadtest`: for the service's peak, use `vae-loadtest`, or run
Locust with `--processes`.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, events, task

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.loadtest import FORMATS, MAX_MESSAGE_BYTES, METHODS, LoadConfig, build_payloads

grpc_gevent.init_gevent()  # gRPC's blocking calls must yield to the other gevent users


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument("--vae-method", choices=sorted(METHODS), default="sample")
    parser.add_argument("--vae-count", type=int, default=1, help="images per request")
    parser.add_argument("--vae-format", choices=sorted(FORMATS), default="uint8")
    parser.add_argument("--vae-timeout", type=float, default=30.0, help="per-call deadline, s")


_payloads: dict[tuple[str, str, int, str], list[bytes]] = {}


def _requests(channel: grpc.Channel, target: str, options: Any) -> list[bytes]:
    """The serialized requests, built once per process."""
    key = (target, options.vae_method, options.vae_count, options.vae_format)
    if key not in _payloads:
        latent_size = None
        if options.vae_method == "decode":
            info = vae_pb2_grpc.VaeServiceStub(channel).GetModelInfo(
                vae_pb2.GetModelInfoRequest(), timeout=options.vae_timeout
            )
            latent_size = info.latent_size
        config = LoadConfig(
            targets=(target,),
            method=options.vae_method,
            count=options.vae_count,
            image_format=options.vae_format,
        )
        _payloads[key] = build_payloads(config, latent_size)[0]
    return _payloads[key]


class VaeUser(User):
    wait_time = constant(0)

    def on_start(self) -> None:
        host = (self.host or "localhost:50051").removeprefix("grpc://")
        options = self.environment.parsed_options
        self.channel = grpc.insecure_channel(
            host,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.method = METHODS[options.vae_method]
        self.call = self.channel.unary_unary(
            f"/vae.v1.VaeService/{self.method}",
            request_serializer=None,  # bytes in, bytes out
            response_deserializer=None,
        )
        self.payloads = _requests(self.channel, host, options)
        self.timeout = options.vae_timeout
        self.sent = 0

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def call_vae(self) -> None:
        payload = self.payloads[self.sent % len(self.payloads)]
        self.sent += 1
        exception: Exception | None = None
        length = 0
        start = time.perf_counter()
        try:
            length = len(self.call(payload, timeout=self.timeout))
        except grpc.RpcError as exc:  # grouped by status in Locust's error report
            exception = RuntimeError(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
        self.environment.events.request.fire(
            request_type="grpc",
            name=self.method,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )
