"""The Open Inference Protocol's own clients against vae-serve, unchanged: a tritonclient script
and perf_analyzer (both from the tritonclient 2.51.0 wheel), run from their own venv
(`make v2-client`: tritonclient pins protobuf<5 and numpy<2). Skipped, saying so, without it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from descriptor_fields import fields
from service_harness import Served

from service.proto.inference.v2 import grpc_predict_v2_pb2
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / "bench" / "peers" / ".venv-tritonclient"
PYTHON = VENV / "bin" / "python"
PERF_ANALYZER = VENV / "bin" / "perf_analyzer"
PERF_LIBS = VENV / "perf-libs"
CHECK = Path(__file__).with_name("tritonclient_check.py")
LATENT = 4
# vae-serve's one addition to the protocol's messages (ModelMetadata's parameters).
OURS_ONLY = {("ModelMetadataResponse", "parameters"), ("ModelMetadataResponse.ParametersEntry", "")}

needs_tritonclient = pytest.mark.skipif(
    not PYTHON.exists(), reason=f"no {VENV.relative_to(ROOT)}: run `make v2-client`"
)


def run_check(*args: str) -> Any:
    done = subprocess.run(
        [str(PYTHON), str(CHECK), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def v1_decode_uint8(stub: vae_pb2_grpc.VaeServiceStub, z: np.ndarray) -> bytes:
    tensor = vae_pb2.Tensor(shape=z.shape, dtype=vae_pb2.DATA_TYPE_FLOAT32, data=z.tobytes())
    request = vae_pb2.DecodeRequest(latents=tensor, format=vae_pb2.IMAGE_FORMAT_UINT8)
    return stub.Decode(request, timeout=30).images.tensor.data


@needs_tritonclient
def test_a_tritonclient_script_runs_unchanged(
    served: Served, stub: vae_pb2_grpc.VaeServiceStub
) -> None:
    seen = run_check(served.target, "tiny-vae", str(LATENT), "7")
    assert (seen["live"], seen["ready"], seen["model_ready"]) == (True, True, True)
    assert seen["server"]["name"] == "vae-serve"
    assert seen["decoder"]["versions"] == ["1"]
    assert seen["decoder"]["inputs"] == [
        {"name": "latent", "datatype": "FP32", "shape": ["-1", str(LATENT)]}
    ]
    assert [o["name"] for o in seen["encoder"]["outputs"]] == ["mean", "log_variance"]
    assert seen["config"]["max_batch_size"] == 4096

    decoded = seen["decode"]
    z = np.frombuffer(bytes.fromhex(decoded["latents"]), np.float32).reshape(5, LATENT)
    dtype, shape, data = decoded["image"]
    assert (dtype, shape, decoded["id"]) == ("uint8", [5, 28, 28], "t-1")
    assert bytes.fromhex(data) == v1_decode_uint8(stub, z)
    assert decoded["probabilities"][:2] == ["float32", [5, 28, 28]]

    pixels = vae_pb2.Tensor(
        shape=[3, 28, 28],
        dtype=vae_pb2.DATA_TYPE_UINT8,
        data=bytes.fromhex(seen["encode"]["pixels"]),
    )
    expected = stub.Encode(vae_pb2.EncodeRequest(images=vae_pb2.ImageInput(tensor=pixels)))
    mean_shape, mean = seen["encode"]["mean"]
    assert mean_shape == [3, LATENT]
    np.testing.assert_allclose(
        np.frombuffer(bytes.fromhex(mean), np.float32),
        np.frombuffer(expected.mean.data, np.float32),
        rtol=1e-6,
        atol=1e-6,
    )

    errors = seen["errors"]
    assert errors["shape"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": f"latent.shape: expected [N, {LATENT}] (the latent size), got [2, {LATENT + 1}]",
    }
    assert errors["datatype"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "latent.datatype: expected FP32, got 'FP64'",
    }
    unknown = "unknown model 'nope'; this server serves tiny-vae-decoder, tiny-vae-encoder"
    assert errors["model"] == {"status": "StatusCode.NOT_FOUND", "message": unknown}
    assert errors["infer_model"] == {"status": "StatusCode.NOT_FOUND", "message": unknown}


@needs_tritonclient
def test_our_proto_has_the_protocols_field_numbers() -> None:
    """Every message, field and enum value of proto/inference/v2 is tritonclient's own (Triton's
    grpc_service.proto and model_config.proto): same number, type and label."""
    theirs = run_check("descriptors")
    ours = fields([grpc_predict_v2_pb2.DESCRIPTOR])
    checked = 0
    for message, ours_fields in ours.items():
        if (message, "") in OURS_ONLY:
            continue
        assert message in theirs, message
        for name, described in ours_fields.items():
            if (message, name) in OURS_ONLY:
                continue
            assert theirs[message].get(name) == described, (message, name)
            checked += 1
    assert checked > 100


@needs_tritonclient
@pytest.mark.skipif(not PERF_LIBS.exists(), reason="no perf-libs: run `make v2-client`")
def test_perf_analyzer_drives_vae_serve(served: Served) -> None:
    """perf_analyzer reads ModelMetadata and ModelConfig, sends ModelInfer and reads
    ModelStatistics (its server-side figures); a short fixed-count run completes."""
    command = [
        str(PERF_ANALYZER),
        *("-m", "tiny-vae-decoder", "-u", served.target, "-i", "grpc"),
        *("--shape", f"latent:{LATENT}", "-b", "8", "--concurrency-range", "2"),
        *("--input-data", "zero", "--measurement-mode", "count_windows"),
        *("--measurement-request-count", "50", "--stability-percentage", "999"),
        *("--max-trials", "3"),
    ]
    env = {**os.environ, "LD_LIBRARY_PATH": str(PERF_LIBS)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Successful request count" in done.stdout  # ModelStatistics was read
    assert "Throughput:" in done.stdout
