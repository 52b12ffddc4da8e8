"""What a tritonclient user's script does, run against vae-serve by test_tritonclient.py in the
tritonclient venv (bench/peers/.venv-tritonclient: tritonclient 2.51.0 pins protobuf<5 and
numpy<2). Prints one JSON object with what it saw; the test checks it against vae.v1.

    python tests/v2/tritonclient_check.py 127.0.0.1:50051 mnist-vae 32 <seed>
    python tests/v2/tritonclient_check.py descriptors   # tritonclient's messages and fields
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from descriptor_fields import fields
from tritonclient.utils import InferenceServerException


def error_of(call: Any) -> dict[str, str]:
    try:
        call()
    except InferenceServerException as e:
        return {"status": str(e.status()), "message": str(e.message())}
    return {"status": "OK", "message": ""}


def main(target: str, name: str, latent_size: int, seed: int) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(url=target)
    decoder, encoder = f"{name}-decoder", f"{name}-encoder"
    seen: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(decoder),
        "server": client.get_server_metadata(as_json=True),
        "decoder": client.get_model_metadata(decoder, as_json=True),
        "encoder": client.get_model_metadata(encoder, as_json=True),
        "config": client.get_model_config(decoder, as_json=True)["config"],
    }

    z = np.random.default_rng(seed).standard_normal((5, latent_size), dtype=np.float32)
    latent = grpcclient.InferInput("latent", list(z.shape), "FP32")
    latent.set_data_from_numpy(z)
    outputs = [
        grpcclient.InferRequestedOutput("image"),
        grpcclient.InferRequestedOutput("probabilities"),
    ]
    result = client.infer(decoder, inputs=[latent], outputs=outputs, request_id="t-1")
    image, probabilities = result.as_numpy("image"), result.as_numpy("probabilities")
    seen["decode"] = {
        "id": result.get_response().id,
        "latents": z.tobytes().hex(),
        "image": [str(image.dtype), list(image.shape), image.tobytes().hex()],
        "probabilities": [
            str(probabilities.dtype),
            list(probabilities.shape),
            probabilities.tobytes().hex(),
        ],
    }

    pixels = np.random.default_rng(seed).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    image_in = grpcclient.InferInput("image", list(pixels.shape), "UINT8")
    image_in.set_data_from_numpy(pixels)
    encoded = client.infer(encoder, inputs=[image_in])
    mean = encoded.as_numpy("mean")
    seen["encode"] = {
        "mean": [list(mean.shape), mean.tobytes().hex()],
        "pixels": pixels.tobytes().hex(),
    }

    wrong_shape = grpcclient.InferInput("latent", [2, latent_size + 1], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((2, latent_size + 1), np.float32))
    wrong_type = grpcclient.InferInput("latent", [2, latent_size], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((2, latent_size), np.float64))
    seen["errors"] = {
        "shape": error_of(lambda: client.infer(decoder, inputs=[wrong_shape])),
        "datatype": error_of(lambda: client.infer(decoder, inputs=[wrong_type])),
        "model": error_of(lambda: client.get_model_metadata("nope")),
        "infer_model": error_of(lambda: client.infer("nope", inputs=[latent])),
    }
    client.close()
    return seen


if __name__ == "__main__":
    if sys.argv[1] == "descriptors":
        from tritonclient.grpc import model_config_pb2, service_pb2

        print(json.dumps(fields([service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR])))
    else:
        print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
