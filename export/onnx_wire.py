"""Does an ONNX file keep tensors outside itself? Read from its protobuf wire format, without
the `onnx` package (the serving image has none).

A tensor stored as external data (`data_location: EXTERNAL`) names another file that ONNX
Runtime reads at load time: its weights would escape the sha256 the manifest records for the
graph, and a path inside the graph could point anywhere. The service refuses such graphs, so
`external_tensors` walks every place a tensor can sit: initializers, sparse initializers,
node attributes (Constant values, the subgraphs of If, Loop and Scan, at any depth), local
functions and training graphs. Field numbers are those of onnx/onnx.proto.
"""

from __future__ import annotations

from collections.abc import Iterator

# message -> {field number: message type of that (length-delimited) field}
MODEL, GRAPH, NODE, ATTRIBUTE, TENSOR, SPARSE, FUNCTION, TRAINING = range(8)
CHILDREN: dict[int, dict[int, int]] = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    NODE: {5: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    SPARSE: {1: TENSOR, 2: TENSOR},
    FUNCTION: {7: NODE, 11: ATTRIBUTE},
    TRAINING: {1: GRAPH, 2: GRAPH},
    TENSOR: {},
}
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
EXTERNAL = 1  # TensorProto.DataLocation
MAX_DEPTH = 64  # nested messages (subgraphs within subgraphs); far beyond any real graph


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("a truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each field: an int for varints, a view for length-delimited
    fields; fixed-width fields are skipped."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | memoryview
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value = data[pos : pos + length]
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            continue
        else:
            raise WireError(f"wire type {wire} (groups are not used by ONNX)")
        if pos > len(data):
            raise WireError("a field runs past the end of its message")
        yield number, value


def external_tensors(model: bytes) -> list[str]:
    """The names of the tensors of a serialized ModelProto stored as external data (empty for
    a self-contained file). Raises WireError on bytes that are not a protobuf message."""
    found: list[str] = []

    def walk(data: memoryview, kind: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise WireError(f"messages nested more than {MAX_DEPTH} deep")
        children = CHILDREN[kind]
        name, external = "", False
        for number, value in _fields(data):
            if kind == TENSOR:
                if number == TENSOR_NAME and isinstance(value, memoryview):
                    name = bytes(value).decode("utf-8", "replace")
                elif number == TENSOR_EXTERNAL_DATA or (
                    number == TENSOR_DATA_LOCATION and value == EXTERNAL
                ):
                    external = True
            elif number in children and isinstance(value, memoryview):
                walk(value, children[number], depth + 1)
        if external:
            found.append(name or "(unnamed)")

    walk(memoryview(model), MODEL, 0)
    return found
