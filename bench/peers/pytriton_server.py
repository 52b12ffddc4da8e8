"""Peer: the VAE decoder served by Triton Inference Server through PyTriton (benchmark only).

Run with the peer's own venv (`make peers`):

    bench/peers/.venv-triton/bin/python bench/peers/pytriton_server.py models/mnist-vae/1 \
        --grpc-port 8101

Two Triton models over Triton's gRPC (KServe V2): `vae_decoder` returns `probabilities` FP32
[N, 784] and `vae_decoder_uint8` returns them as UINT8 [N, 784] (count x 784 bytes, like our
Sample(count, uint8)). Input `latent` FP32 [N, L]: Triton has no "sample" call, so the client
draws z ~ N(0, I) and sends it. That favours the peer slightly: it skips the random draw our
Sample(count) makes, for 128 bytes more to receive per image. Dynamic batching is on; each model
instance is a Python callable running the ONNX Runtime session (one instance per usable core).

What Triton needs on this machine (measured, see shared/NOTES.md): LD_LIBRARY_PATH holding
this Python's own lib folder (else the Python backend stub loads Debian's libpython and fails
with an RLock error), a model repository folder that exists beforehand, the statistics endpoint
unprotected so perf_analyzer can read it, and a SIGTERM handler for a clean stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from decoder import IMAGE_SIZE, Decoder
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

log = logging.getLogger("pytriton_server")


def ensure_python_libs_on_path() -> None:
    """Re-exec with this Python's lib folder first on LD_LIBRARY_PATH (read at process start)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir
        os.execv(sys.executable, [sys.executable, *sys.argv])


def make_infer(
    decode: Callable[[np.ndarray], np.ndarray],
) -> Callable[..., dict[str, np.ndarray]]:
    @batch
    def infer(latent: np.ndarray) -> dict[str, np.ndarray]:
        return {"probabilities": decode(np.ascontiguousarray(latent, dtype=np.float32))}

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path, help="<repo>/<name>/<version>/ with decoder.onnx")
    parser.add_argument("--grpc-port", type=int, default=8101)
    parser.add_argument("--http-port", type=int, default=8100)
    parser.add_argument("--metrics-port", type=int, default=8102)
    parser.add_argument("--max-batch-size", type=int, default=1024)
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--precision", default="fp32", help="fp32, or a variant: int8")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="a new folder for Triton's files (default: a temp dir, removed)",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="model instances (callables sharing one session); default: one per usable core",
    )
    args = parser.parse_args()
    ensure_python_libs_on_path()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    decoder = Decoder(args.version_dir, threads=args.threads, precision=args.precision)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pytriton-"))
    repository = workdir / "model-repository"
    repository.mkdir(parents=True)  # Triton wants it to exist beforehand
    config = TritonConfig(
        model_repository=repository,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    # Leave statistics (and the rest) unprotected: perf_analyzer reads them without a token.
    security = TritonSecurityConfig(restricted_endpoints=[])
    model_config = ModelConfig(
        max_batch_size=args.max_batch_size,
        batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
    )

    # serve() stops Triton and returns on KeyboardInterrupt: make SIGTERM raise it too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve(config, security, model_config, decoder, args.instances, workdir / "workspace")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    log.info("stopped")


def serve(
    config: TritonConfig,
    security: TritonSecurityConfig,
    model_config: ModelConfig,
    decoder: Decoder,
    instances: int,
    workspace: Path,
) -> None:
    outputs = {
        "vae_decoder": (decoder.probabilities, np.float32),
        "vae_decoder_uint8": (decoder.pixels, np.uint8),
    }
    with Triton(config=config, workspace=workspace, security_config=security) as triton:
        for name, (decode, dtype) in outputs.items():
            infer_funcs: list[Any] = [make_infer(decode) for _ in range(instances)]
            triton.bind(
                model_name=name,
                infer_func=infer_funcs,
                inputs=[Tensor(name="latent", dtype=np.float32, shape=(decoder.latent_size,))],
                outputs=[Tensor(name="probabilities", dtype=dtype, shape=(IMAGE_SIZE,))],
                config=model_config,
                strict=False,
            )
        log.info("serving %s on gRPC port %s", sorted(outputs), config.grpc_port)
        triton.serve()


if __name__ == "__main__":
    main()
