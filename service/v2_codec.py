"""The Open Inference Protocol (KServe V2) view of the served model, and its tensors <-> numpy.

A V2 client sees two models, named after the served one (`mnist-vae`):

- `<name>-decoder`: input `latent` FP32 [N, latent_size]; outputs `probabilities` FP32
  [N, height, width] (vae.v1's IMAGE_FORMAT_PROBABILITIES) and `image` UINT8 [N, height, width]
  (round(255 p), vae.v1's IMAGE_FORMAT_UINT8).
- `<name>-encoder`: input `image` FP32 in [0, 1] or UINT8, [N, pixels] or [N, height, width];
  outputs `mean` and `log_variance` FP32 [N, latent_size].

(height x width is IMAGE_SHAPE, `service.settings`; pixels its IMAGE_SIZE.)

Their version is the repository's live version, and N is limited as in vae.v1
(`max_items_per_request`). The input is checked by vae.v1's own validation (`service.codec`,
`service.images`: shape, finite values, latent range, N within the limit), after the V2 framing
(datatype, shape against the bytes or values sent) is checked here; every error names the
tensor.

Tensors travel as `raw_input_contents` / `raw_output_contents` (little-endian bytes, what
tritonclient and perf_analyzer send) or as typed `contents` (fp32_contents, uint_contents).
A reply uses the form its request used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from service import codec
from service.errors import InvalidArgument, ServiceError
from service.images import HEIGHT, WIDTH, images_from_tensor
from service.model.graphs import LATENT_LIMIT
from service.model.runtime import ModelInfo
from service.proto.inference.v2 import grpc_predict_v2_pb2 as pb
from service.proto.vae.v1 import vae_pb2
from service.settings import IMAGE_SHAPE, IMAGE_SIZE
from service.tensors import MAX_DIMS

PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX model on ONNX Runtime
DTYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
V1_DTYPES = {"FP32": vae_pb2.DATA_TYPE_FLOAT32, "UINT8": vae_pb2.DATA_TYPE_UINT8}
CONFIG_TYPES = {"FP32": pb.TYPE_FP32, "UINT8": pb.TYPE_UINT8}
CONTENTS_FIELD = {"FP32": "fp32_contents", "UINT8": "uint_contents"}


class NotFound(ServiceError):
    """An unknown model, or a version not served."""

    code = grpc.StatusCode.NOT_FOUND


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # the one reported in metadata and config
    dims: tuple[int, ...]  # without the batch dimension


@dataclass(frozen=True)
class V2Model:
    name: str
    network: str  # "decoder" or "encoder"
    input: Tensor
    outputs: tuple[Tensor, ...]
    accepts: str  # the input forms accepted, in words (ModelMetadata's parameters)

    def __post_init__(self) -> None:
        encoder = self.network == "encoder"
        object.__setattr__(self, "input_datatypes", ("FP32", "UINT8") if encoder else ("FP32",))
        object.__setattr__(self, "outputs_by_name", {t.name: t for t in self.outputs})

    input_datatypes: tuple[str, ...] = field(init=False)
    outputs_by_name: Mapping[str, Tensor] = field(init=False)


def models_of(info: ModelInfo) -> dict[str, V2Model]:
    """The V2 models of the served model, by name."""
    latent, image = (info.latent_size,), tuple(info.image_shape)
    decoder = V2Model(
        f"{info.name}-decoder",
        "decoder",
        Tensor("latent", "FP32", latent),
        (Tensor("probabilities", "FP32", image), Tensor("image", "UINT8", image)),
        f"latent: FP32 [-1, {info.latent_size}], values within +-{LATENT_LIMIT:g}",
    )
    encoder = V2Model(
        f"{info.name}-encoder",
        "encoder",
        Tensor("image", "FP32", (IMAGE_SIZE,)),
        (Tensor("mean", "FP32", latent), Tensor("log_variance", "FP32", latent)),
        f"image: FP32 in [0, 1] or UINT8, [-1, {IMAGE_SIZE}] or [-1, {HEIGHT}, {WIDTH}]",
    )
    return {decoder.name: decoder, encoder.name: encoder}


def find_model(models: Mapping[str, V2Model], name: str, version: str, info: ModelInfo) -> V2Model:
    """The model called `name` at `version` ("" is the live version); NotFound otherwise."""
    model = models.get(name)
    if model is None:
        raise NotFound(f"unknown model '{name}'; this server serves {', '.join(sorted(models))}")
    if version and version != str(info.version):
        raise NotFound(f"model '{name}' has no version '{version}'; serving version {info.version}")
    return model


# Requests -> numpy


def read_input(
    request: pb.ModelInferRequest, model: V2Model, info: ModelInfo, *, limit: int
) -> tuple[np.ndarray, bool]:
    """The model's one input, validated: latents float32 [N, latent] or images float32 [N, pixels]
    in [0, 1]; and whether it came as typed contents (the reply then uses them too)."""
    name = model.input.name
    if len(request.inputs) != 1:
        got = ", ".join(f"'{t.name}'" for t in request.inputs) or "none"
        raise InvalidArgument("inputs", f"expected one input tensor, '{name}', got {got}")
    tensor = request.inputs[0]
    if tensor.name != name:
        raise InvalidArgument(
            "inputs[0].name", f"expected '{name}' (the input of {model.name}), got '{tensor.name}'"
        )
    if tensor.datatype not in model.input_datatypes:
        raise InvalidArgument(
            f"{name}.datatype",
            f"expected {' or '.join(model.input_datatypes)}, got '{tensor.datatype}'",
        )
    shape = list(tensor.shape)
    if not 1 <= len(shape) <= MAX_DIMS or any(d < 0 for d in shape):
        raise InvalidArgument(
            f"{name}.shape",
            f"expected [N, ...] of at most {MAX_DIMS} non-negative sizes, got "
            f"{shape[: MAX_DIMS + 1]}",
        )
    data, typed = _input_bytes(request, tensor, name, math.prod(shape))
    v1 = vae_pb2.Tensor(shape=shape, dtype=V1_DTYPES[tensor.datatype], data=data)
    if model.network == "decoder":
        array = codec.latents_in(v1, name, latent_size=info.latent_size, limit=limit)
    else:
        array = images_from_tensor(v1, name, limit=limit)
    return array, typed


def _input_bytes(
    request: pb.ModelInferRequest,
    tensor: pb.ModelInferRequest.InferInputTensor,
    name: str,
    elements: int,
) -> tuple[bytes, bool]:
    """The input's little-endian bytes, from raw_input_contents or typed contents, checked
    against its shape's element count."""
    dtype = DTYPES[tensor.datatype]
    field = CONTENTS_FIELD[tensor.datatype]
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise InvalidArgument(
                "raw_input_contents", f"expected one entry (one per input), got {len(raw)}"
            )
        if tensor.HasField("contents"):
            raise InvalidArgument(
                f"{name}.contents", "expected raw_input_contents or contents, got both"
            )
        data = raw[0]  # a copy of the field's bytes on each read: read it once
        if len(data) != elements * dtype.itemsize:
            raise InvalidArgument(
                f"{name}",
                f"expected {elements * dtype.itemsize} bytes in raw_input_contents[0] for "
                f"{tensor.datatype} {list(tensor.shape)}, got {len(data)}",
            )
        return data, False
    values = getattr(tensor.contents, field)
    if len(values) != elements:
        raise InvalidArgument(
            f"{name}.contents.{field}",
            f"expected {elements} values for {tensor.datatype} {list(tensor.shape)}, got "
            f"{len(values)} (or send raw_input_contents)",
        )
    array = np.asarray(values)
    if tensor.datatype == "UINT8" and elements and int(array.max()) > 255:
        raise InvalidArgument(f"{name}.contents.{field}", "expected UINT8 values 0 to 255")
    return array.astype(dtype).tobytes(), True


def requested_outputs(request: pb.ModelInferRequest, model: V2Model) -> list[Tensor]:
    """The outputs asked for, in the request's order; every output if none is named."""
    if not request.outputs:
        return list(model.outputs)
    known = model.outputs_by_name
    wanted: list[Tensor] = []
    for i, output in enumerate(request.outputs):
        tensor = known.get(output.name)
        if tensor is None:
            raise InvalidArgument(
                f"outputs[{i}].name",
                f"expected one of {', '.join(known)} (the outputs of {model.name}), got "
                f"'{output.name}'",
            )
        if tensor in wanted:
            raise InvalidArgument(f"outputs[{i}].name", f"'{output.name}' is requested twice")
        wanted.append(tensor)
    return wanted


# numpy -> responses


def decoder_outputs(decoded: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The decoder's outputs asked for, each [N, pixels] (probabilities float32, image uint8 as
    vae.v1 Decode makes them: the same run, so the same bytes), as [N, height, width]."""
    return [array.reshape(-1, *IMAGE_SHAPE) for array in decoded]


def encoder_outputs(
    mean: np.ndarray, log_variance: np.ndarray, wanted: Sequence[Tensor]
) -> list[np.ndarray]:
    return [mean if t.name == "mean" else log_variance for t in wanted]


def outputs_into(
    response: pb.ModelInferResponse,
    wanted: Sequence[Tensor],
    produce: Callable[[], Sequence[np.ndarray]],
    *,
    typed: bool,
) -> None:
    """Write the outputs that `produce` makes into the reply being built (in place: no
    message copies)."""
    for tensor, array in zip(wanted, produce(), strict=True):
        output = response.outputs.add(name=tensor.name, datatype=tensor.datatype)
        output.shape.extend(array.shape)
        little = array.astype(DTYPES[tensor.datatype], copy=False)  # a no-op on x86
        if typed:
            getattr(output.contents, CONTENTS_FIELD[tensor.datatype]).extend(
                little.ravel().tolist()
            )
        else:
            response.raw_output_contents.append(little.tobytes())


def metadata_out(model: V2Model, info: ModelInfo, limit: int) -> pb.ModelMetadataResponse:
    def described(t: Tensor) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(
            name=t.name, datatype=t.datatype, shape=(-1, *t.dims)
        )

    response = pb.ModelMetadataResponse(
        name=model.name,
        versions=[str(info.version)],
        platform=PLATFORM,
        inputs=[described(model.input)],
        outputs=[described(t) for t in model.outputs],
    )
    response.parameters["max_batch_size"].int64_param = limit
    response.parameters["accepts"].string_param = model.accepts
    return response


def config_out(model: V2Model, limit: int, max_queue_delay: float) -> pb.ModelConfig:
    """Triton's view: max_batch_size > 0, so dims leave out the batch dimension."""
    return pb.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=limit,
        input=[
            pb.ModelInput(
                name=model.input.name,
                data_type=CONFIG_TYPES[model.input.datatype],
                dims=model.input.dims,
            )
        ],
        output=[
            pb.ModelOutput(name=t.name, data_type=CONFIG_TYPES[t.datatype], dims=t.dims)
            for t in model.outputs
        ],
        dynamic_batching=pb.ModelDynamicBatching(
            max_queue_delay_microseconds=round(max_queue_delay * 1e6)
        ),
    )
