"""Peer: the VAE decoder served by Seldon MLServer through a custom runtime (benchmark only).

Run with the peer's own venv (`make peers`):

    bench/peers/.venv-mlserver/bin/python bench/peers/mlserver_runtime.py models/mnist-vae/1 \
        --grpc-port 8201

writes settings.json and one model-settings.json per model into a temporary folder and becomes
`mlserver start` on it (exec: the pid stays the server's, and SIGTERM stops it cleanly). Two
models over MLServer's V2 gRPC, as for the Triton peer: `vae_decoder` returns `probabilities`
FP32 [N, 784], `vae_decoder_uint8` the same as UINT8 (count x 784 bytes, like our
Sample(count, uint8)). Input `latent` FP32 [N, L], drawn by the client.

The runtime is what the MLServer docs write: decode the input with NumpyCodec, run the model in
`predict` (on the event loop), encode the output with NumpyCodec. Adaptive batching is on; the
inference runs in the main process (`parallel_workers=0`, about 2x faster here than a worker
process for this model). MLServer 1.7.1 needs uvloop 0.21.0 (see requirements-mlserver.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from decoder import Decoder
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

MODELS = {"vae_decoder": "float32", "vae_decoder_uint8": "uint8"}


class DecoderRuntime(MLModel):
    """latent FP32 [N, L] -> probabilities FP32 or UINT8 [N, 784] (per `extra.output`)."""

    async def load(self) -> bool:
        params = self.settings.parameters
        assert params is not None and params.uri is not None and params.extra is not None
        threads, precision = int(params.extra.get("threads", 1)), params.extra.get("precision")
        self.decoder = Decoder(Path(params.uri), threads=threads, precision=precision or "fp32")
        self.decode_fn = (
            self.decoder.pixels
            if params.extra.get("output") == "uint8"
            else self.decoder.probabilities
        )
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        latents = self.decode(payload.inputs[0], default_codec=NumpyCodec)
        images = self.decode_fn(
            latents.astype("float32", copy=False).reshape(-1, self.decoder.latent_size)
        )
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(name="probabilities", payload=images)],
        )


def write_settings(
    folder: Path,
    version_dir: Path,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    max_batch_size: int,
    max_batch_time: float,
    threads: int,
    precision: str = "fp32",
) -> None:
    """settings.json (the server) and <model>/model-settings.json (each model) in `folder`."""
    server = {
        "debug": False,
        "host": "127.0.0.1",
        "grpc_port": grpc_port,
        "http_port": http_port,
        "metrics_port": metrics_port,
        "parallel_workers": 0,
        "metrics_dir": str(folder / ".metrics"),
        "environments_dir": str(folder / ".envs"),
    }
    (folder / "settings.json").write_text(json.dumps(server, indent=2))
    for name, output in MODELS.items():
        model = {
            "name": name,
            "implementation": "mlserver_runtime.DecoderRuntime",
            "max_batch_size": max_batch_size,
            "max_batch_time": max_batch_time,
            "parameters": {
                "uri": str(version_dir.resolve()),
                "extra": {"output": output, "threads": threads, "precision": precision},
            },
        }
        (folder / name).mkdir()
        (folder / name / "model-settings.json").write_text(json.dumps(model, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path, help="<repo>/<name>/<version>/ with decoder.onnx")
    parser.add_argument("--grpc-port", type=int, default=8201)
    parser.add_argument("--http-port", type=int, default=8200)
    parser.add_argument("--metrics-port", type=int, default=8202)
    parser.add_argument("--max-batch-size", type=int, default=1024)
    parser.add_argument("--max-batch-time", type=float, default=0.0005, help="seconds")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--precision", default="fp32", help="fp32, or a variant: int8")
    parser.add_argument(
        "--settings-dir",
        type=Path,
        help="an empty folder for the settings (default: a new temp dir)",
    )
    args = parser.parse_args()

    folder = args.settings_dir or Path(tempfile.mkdtemp(prefix="mlserver-settings-"))
    write_settings(
        folder,
        args.version_dir,
        args.grpc_port,
        args.http_port,
        args.metrics_port,
        args.max_batch_size,
        args.max_batch_time,
        args.threads,
        args.precision,
    )
    # MLServer imports `mlserver_runtime.DecoderRuntime`: put this folder on its import path.
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    mlserver = shutil.which("mlserver", path=str(Path(sys.executable).parent)) or "mlserver"
    os.execv(mlserver, [mlserver, "start", str(folder)])


if __name__ == "__main__":
    main()
