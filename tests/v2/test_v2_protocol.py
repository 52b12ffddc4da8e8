"""The Open Inference Protocol (KServe V2) on the real server, through the project's own stubs
of `proto/inference/v2/grpc_predict_v2.proto`: the same port, model and batchers as vae.v1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from reliability_harness import health, metric, refusal, wait_until
from service_harness import Served, open_channel, running, tiny_settings

from service.proto.inference.v2 import grpc_predict_v2_pb2 as pb
from service.proto.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc

DECODER, ENCODER = "tiny-vae-decoder", "tiny-vae-encoder"
LATENT = 4  # the tiny model's latent size
TIMEOUT = 30.0


def infer_request(
    model: str,
    array: np.ndarray,
    name: str = "latent",
    datatype: str = "FP32",
    outputs: Sequence[str] = (),
    typed: bool = False,
) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=array.shape)
    request = pb.ModelInferRequest(
        model_name=model,
        id="call-1",
        inputs=[tensor],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs],
    )
    if typed:
        field = "fp32_contents" if datatype == "FP32" else "uint_contents"
        getattr(request.inputs[0].contents, field).extend(array.ravel().tolist())
    else:
        request.raw_input_contents.append(array.tobytes())
    return request


def raw_outputs(reply: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "UINT8": np.uint8}
    return {
        out.name: np.frombuffer(raw, dtypes[out.datatype]).reshape(out.shape)
        for out, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)
    }


def latents(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, LATENT), dtype=np.float32)


def v1_decode(
    stub: vae_pb2_grpc.VaeServiceStub, z: np.ndarray, image_format: vae_pb2.ImageFormat.ValueType
) -> bytes:
    tensor = vae_pb2.Tensor(shape=z.shape, dtype=vae_pb2.DATA_TYPE_FLOAT32, data=z.tobytes())
    reply = stub.Decode(vae_pb2.DecodeRequest(latents=tensor, format=image_format), timeout=TIMEOUT)
    return reply.images.tensor.data


def error_of(v2: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        v2.ModelInfer(request, timeout=TIMEOUT)
    return caught.value


# ---- readiness, metadata, config ----


def test_live_ready_and_model_ready(v2: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert v2.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT).live
    assert v2.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready
    for name, version, ready in [
        (DECODER, "", True),
        (ENCODER, "1", True),
        (DECODER, "2", False),  # a version not served: not ready, not an error
        ("mnist-vae-decoder", "", False),
    ]:
        request = pb.ModelReadyRequest(name=name, version=version)
        assert v2.ModelReady(request, timeout=TIMEOUT).ready is ready, (name, version)


def test_server_and_model_metadata(v2: pb_grpc.GRPCInferenceServiceStub) -> None:
    server = v2.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT)
    assert server.name == "vae-serve"
    assert list(server.extensions) == ["model_configuration", "statistics"]

    decoder = v2.ModelMetadata(pb.ModelMetadataRequest(name=DECODER), timeout=TIMEOUT)
    assert (decoder.name, list(decoder.versions), decoder.platform) == (
        DECODER,
        ["1"],
        "onnxruntime_onnx",
    )
    described = [(t.name, t.datatype, list(t.shape)) for t in (*decoder.inputs, *decoder.outputs)]
    assert described == [
        ("latent", "FP32", [-1, LATENT]),
        ("probabilities", "FP32", [-1, 28, 28]),
        ("image", "UINT8", [-1, 28, 28]),
    ]
    assert decoder.parameters["max_batch_size"].int64_param == 4096  # max_items_per_request

    encoder = v2.ModelMetadata(pb.ModelMetadataRequest(name=ENCODER, version="1"), timeout=TIMEOUT)
    described = [(t.name, t.datatype, list(t.shape)) for t in (*encoder.inputs, *encoder.outputs)]
    assert described == [
        ("image", "FP32", [-1, 784]),
        ("mean", "FP32", [-1, LATENT]),
        ("log_variance", "FP32", [-1, LATENT]),
    ]
    assert "UINT8" in encoder.parameters["accepts"].string_param


def test_model_config_as_perf_analyzer_reads_it(v2: pb_grpc.GRPCInferenceServiceStub) -> None:
    config = v2.ModelConfig(pb.ModelConfigRequest(name=DECODER), timeout=TIMEOUT).config
    assert (config.name, config.max_batch_size, config.platform) == (
        DECODER,
        4096,
        "onnxruntime_onnx",
    )
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("latent", pb.TYPE_FP32, [LATENT])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("probabilities", pb.TYPE_FP32, [28, 28]),
        ("image", pb.TYPE_UINT8, [28, 28]),
    ]


def test_reflection_and_health_list_the_protocol(channel: grpc.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)
    names = {s.name for s in reply.list_services_response.service}
    assert {"inference.GRPCInferenceService", "vae.v1.VaeService"} <= names
    assert health(channel, "inference.GRPCInferenceService") == "SERVING"


# ---- ModelInfer: the same model, the same bytes ----


def test_decode_gives_the_same_bytes_as_vae_v1_decode(
    v2: pb_grpc.GRPCInferenceServiceStub, stub: vae_pb2_grpc.VaeServiceStub
) -> None:
    z = latents(5)
    reply = v2.ModelInfer(infer_request(DECODER, z), timeout=TIMEOUT)
    assert (reply.model_name, reply.model_version, reply.id) == (DECODER, "1", "call-1")
    out = raw_outputs(reply)
    assert list(out) == ["probabilities", "image"]  # none named: every output, in order
    assert out["probabilities"].shape == (5, 28, 28) and out["image"].dtype == np.uint8
    assert out["probabilities"].tobytes() == v1_decode(stub, z, vae_pb2.IMAGE_FORMAT_PROBABILITIES)
    assert out["image"].tobytes() == v1_decode(stub, z, vae_pb2.IMAGE_FORMAT_UINT8)


def test_requested_outputs_are_honoured_in_their_order(
    v2: pb_grpc.GRPCInferenceServiceStub, stub: vae_pb2_grpc.VaeServiceStub
) -> None:
    z = latents(3, seed=1)
    reply = v2.ModelInfer(infer_request(DECODER, z, outputs=["image"]), timeout=TIMEOUT)
    assert [o.name for o in reply.outputs] == ["image"]
    assert reply.raw_output_contents[0] == v1_decode(stub, z, vae_pb2.IMAGE_FORMAT_UINT8)
    both = v2.ModelInfer(
        infer_request(DECODER, z, outputs=["image", "probabilities"]), timeout=TIMEOUT
    )
    assert [o.name for o in both.outputs] == ["image", "probabilities"]


def test_typed_contents_in_typed_contents_out(
    v2: pb_grpc.GRPCInferenceServiceStub, stub: vae_pb2_grpc.VaeServiceStub
) -> None:
    z = latents(2, seed=2)
    reply = v2.ModelInfer(infer_request(DECODER, z, typed=True), timeout=TIMEOUT)
    assert not reply.raw_output_contents
    probabilities, image = reply.outputs
    got = np.asarray(probabilities.contents.fp32_contents, np.float32)
    assert got.tobytes() == v1_decode(stub, z, vae_pb2.IMAGE_FORMAT_PROBABILITIES)
    pixels = np.asarray(image.contents.uint_contents, np.uint8)
    assert pixels.tobytes() == v1_decode(stub, z, vae_pb2.IMAGE_FORMAT_UINT8)


def test_encoder_takes_every_image_form_vae_v1_takes(
    v2: pb_grpc.GRPCInferenceServiceStub, stub: vae_pb2_grpc.VaeServiceStub
) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    tensor = vae_pb2.Tensor(
        shape=pixels.shape, dtype=vae_pb2.DATA_TYPE_UINT8, data=pixels.tobytes()
    )
    expected = stub.Encode(
        vae_pb2.EncodeRequest(images=vae_pb2.ImageInput(tensor=tensor)), timeout=TIMEOUT
    )
    forms: list[tuple[np.ndarray, str, bool]] = [
        (pixels, "UINT8", False),
        (pixels.reshape(4, 784), "UINT8", True),
        ((pixels / np.float32(255)).astype(np.float32), "FP32", False),
    ]
    for array, datatype, typed in forms:
        request = infer_request(ENCODER, array, name="image", datatype=datatype, typed=typed)
        reply = v2.ModelInfer(request, timeout=TIMEOUT)
        assert [o.name for o in reply.outputs] == ["mean", "log_variance"]
        if typed:
            mean = np.asarray(reply.outputs[0].contents.fp32_contents, np.float32)
        else:
            mean = raw_outputs(reply)["mean"]
        np.testing.assert_allclose(
            mean.reshape(4, LATENT),
            np.frombuffer(expected.mean.data, np.float32).reshape(4, LATENT),
            rtol=1e-6,
            atol=1e-6,
        )


# ---- errors ----


@pytest.mark.parametrize(
    ("request_", "details"),
    [
        (
            infer_request("nope", latents(1)),
            "unknown model 'nope'; this server serves tiny-vae-decoder, tiny-vae-encoder",
        ),
        (
            pb.ModelInferRequest(model_name=DECODER, model_version="7"),
            "model 'tiny-vae-decoder' has no version '7'; serving version 1",
        ),
    ],
)
def test_unknown_model_or_version_is_not_found(
    v2: pb_grpc.GRPCInferenceServiceStub, request_: pb.ModelInferRequest, details: str
) -> None:
    error = error_of(v2, request_)
    assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert error.details() == details  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        v2.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def _bytes_short() -> pb.ModelInferRequest:
    request = infer_request(DECODER, latents(2))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    return request


@pytest.mark.parametrize(
    ("request_", "details"),
    [
        (
            infer_request(DECODER, latents(2).astype(np.float64), datatype="FP64"),
            "latent.datatype: expected FP32, got 'FP64'",
        ),
        (
            infer_request(DECODER, np.zeros((2, 3), np.float32)),
            f"latent.shape: expected [N, {LATENT}] (the latent size), got [2, 3]",
        ),
        (
            _bytes_short(),
            "latent: expected 32 bytes in raw_input_contents[0] for FP32 [2, 4], got 28",
        ),
        (
            infer_request(DECODER, latents(2), name="z"),
            "inputs[0].name: expected 'latent' (the input of tiny-vae-decoder), got 'z'",
        ),
        (
            infer_request(DECODER, latents(1), outputs=["logits"]),
            "outputs[0].name: expected one of probabilities, image (the outputs of "
            "tiny-vae-decoder), got 'logits'",
        ),
        (
            infer_request(DECODER, np.full((1, LATENT), np.nan, np.float32)),
            "latent.data: expected finite values, found nan at [0, 0]",
        ),
        (
            infer_request(DECODER, np.zeros((4097, LATENT), np.float32)),
            "latent.shape: N = 4097 is above the limit of 4096 per request",
        ),
        (
            infer_request(ENCODER, np.zeros((1, 28, 28), np.float32) + 2, name="image"),
            "image.data: float32 images must lie in [0, 1], got values in [2.0, 2.0]",
        ),
        (
            infer_request(ENCODER, np.zeros((1, 100), np.uint8), name="image", datatype="UINT8"),
            "image.shape: expected [N, 784] or [N, 28, 28], got [1, 100]",
        ),
    ],
    ids=[
        "datatype",
        "shape",
        "bytes",
        "input-name",
        "output-name",
        "nan",
        "limit",
        "range",
        "image-shape",
    ],
)
def test_bad_tensors_are_invalid_argument_naming_the_tensor(
    v2: pb_grpc.GRPCInferenceServiceStub, request_: pb.ModelInferRequest, details: str
) -> None:
    error = error_of(v2, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert error.details() == details  # type: ignore[attr-defined]


# ---- the same batcher, admission and metrics as vae.v1 ----


def test_modelinfer_is_counted_with_vae_v1s_metrics(
    served: Served, v2: pb_grpc.GRPCInferenceServiceStub
) -> None:
    before_ok = metric(served, "vae_requests_total", method="ModelInfer", code="OK")
    before_images = metric(served, "vae_images_generated_total")
    before_bad = metric(served, "vae_requests_total", method="ModelInfer", code="INVALID_ARGUMENT")
    request = pb.ModelStatisticsRequest(name=DECODER)
    calls_before = v2.ModelStatistics(request, timeout=TIMEOUT).model_stats[0].inference_stats
    calls_before_n = calls_before.success.count
    for seed in range(3):
        v2.ModelInfer(infer_request(DECODER, latents(7, seed)), timeout=TIMEOUT)
    error_of(v2, infer_request(DECODER, np.zeros((1, 3), np.float32)))
    assert metric(served, "vae_requests_total", method="ModelInfer", code="OK") == before_ok + 3
    assert metric(served, "vae_images_generated_total") == before_images + 21
    assert (
        metric(served, "vae_requests_total", method="ModelInfer", code="INVALID_ARGUMENT")
        == before_bad + 1
    )
    (stats,) = v2.ModelStatistics(request, timeout=TIMEOUT).model_stats
    assert stats.inference_stats.success.count == calls_before_n + 3
    assert stats.execution_count >= 3 and stats.last_inference > 0


def test_shared_queue_and_admission_with_vae_v1(tiny_model: object) -> None:
    """A V2 call waits in the decoder queue that vae.v1 Sample uses, counts against the same
    max_in_flight (a V2 call refused while vae.v1 calls hold the places, and the other way
    round), while metadata and readiness are answered."""
    settings = tiny_settings(tiny_model, max_in_flight=2, max_queue_delay=60.0)  # type: ignore[arg-type]
    with running(settings) as served, open_channel(served.target) as channel:
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        held_v1 = stub.Sample.future(vae_pb2.SampleRequest(count=3, seed=1), timeout=120)
        held_v2 = v2.ModelInfer.future(infer_request(DECODER, latents(5)), timeout=120)
        wait_until(
            lambda: metric(served, "vae_batch_queue_rows", queue="decoder") == 8,
            "3 rows of Sample and 5 of ModelInfer in one decoder queue",
        )
        refused = refusal(v2.ModelInfer, infer_request(DECODER, latents(1)))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert refused.details() == (  # type: ignore[attr-defined]
            "server busy: max_in_flight (2 inference calls at once) reached; retry with backoff"
        )
        refused = refusal(stub.Sample, vae_pb2.SampleRequest(count=1))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert v2.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready
        assert v2.ModelMetadata(pb.ModelMetadataRequest(name=DECODER), timeout=TIMEOUT).name
        assert (
            metric(served, "vae_requests_total", method="ModelInfer", code="RESOURCE_EXHAUSTED")
            == 1
        )
        held_v1.cancel()
        held_v2.cancel()


def test_v2_over_tls_like_vae_v1(tiny_model: object, tmp_path: Path) -> None:
    """TLS on the port covers V2 too: a TLS client infers; a plaintext one is refused."""
    from bench.certificates import make_pki

    pki = make_pki(tmp_path)
    settings = tiny_settings(tiny_model, tls_cert=pki.server_cert, tls_key=pki.server_key)  # type: ignore[arg-type]
    with running(settings) as served:
        target = f"localhost:{served.service.port}"  # the name the server's certificate holds
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        with grpc.secure_channel(target, credentials) as channel:
            v2 = pb_grpc.GRPCInferenceServiceStub(channel)
            reply = v2.ModelInfer(infer_request(DECODER, latents(2)), timeout=TIMEOUT)
            assert raw_outputs(reply)["image"].shape == (2, 28, 28)
        with grpc.insecure_channel(target) as plain:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.GRPCInferenceServiceStub(plain).ServerLive(
                    pb.ServerLiveRequest(), timeout=TIMEOUT
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_draining_is_not_ready_and_every_v2_call_is_served_through_the_drain(
    tiny_model: object,
) -> None:
    """Once shutdown begins (health NOT_SERVING), V2 ServerReady and ModelReady say false while
    calls are still served; a burst in flight when the stop begins all ends OK and counted."""
    with running(tiny_settings(tiny_model)) as served:  # type: ignore[arg-type]
        registry = served.service.metrics.registry
        with open_channel(served.target) as channel:
            v2 = pb_grpc.GRPCInferenceServiceStub(channel)
            burst = infer_request(DECODER, latents(4096))
            futures = [v2.ModelInfer.future(burst, timeout=120) for _ in range(16)]
            wait_until(
                lambda: (registry.get_sample_value("vae_requests_in_flight") or 0) > 0,
                "calls in flight",
            )
            served.background.run(served.service.health.enter_graceful_shutdown())
            assert not v2.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready
            assert not v2.ModelReady(pb.ModelReadyRequest(name=DECODER), timeout=TIMEOUT).ready
            assert v2.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT).live
            served.background.run(served.service.stop(grace=60, drain=10), timeout=120)
            assert [f.code() for f in futures] == [grpc.StatusCode.OK] * 16
    counted = registry.get_sample_value(
        "vae_requests_total", {"method": "ModelInfer", "code": "OK"}
    )
    assert counted == 16


def test_a_v2_call_whose_deadline_passes_in_the_queue_is_never_computed(
    tiny_model: object,
) -> None:
    settings = tiny_settings(tiny_model, max_queue_delay=60.0)  # type: ignore[arg-type]
    with running(settings) as served, open_channel(served.target) as channel:
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        runs = metric(served, "vae_batch_runs_total", queue="decoder")
        late = refusal(v2.ModelInfer, infer_request(DECODER, latents(1)), timeout=0.5)
        assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        wait_until(
            lambda: (
                metric(served, "vae_requests_total", method="ModelInfer", code="DEADLINE_EXCEEDED")
                == 1
            ),
            "the server to count the expired call",
        )
        assert metric(served, "vae_batch_queue_rows", queue="decoder") == 0
        assert metric(served, "vae_batch_runs_total", queue="decoder") == runs
