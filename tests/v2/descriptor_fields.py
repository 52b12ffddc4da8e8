"""Messages and fields of compiled protobuf files, to compare two compilations of a protocol
(ours and tritonclient's, in tests/v2/test_tritonclient.py)."""

from __future__ import annotations

from typing import Any


def fields(files: list[Any]) -> dict[str, dict[str, list[Any]]]:
    """Every message of the files (nested ones as Outer.Inner): field -> [number, type, label,
    message type name]; every enum: value -> number."""
    from google.protobuf import descriptor_pb2

    found: dict[str, dict[str, list[Any]]] = {}

    def walk(messages: Any, prefix: str) -> None:
        for m in messages:
            found[prefix + m.name] = {
                f.name: [f.number, f.type, f.label, f.type_name.rsplit(".", 1)[-1]] for f in m.field
            }
            walk(m.nested_type, f"{prefix}{m.name}.")

    for file in files:
        proto = descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb)
        walk(proto.message_type, "")
        for enum in proto.enum_type:
            found[f"enum {enum.name}"] = {v.name: [v.number] for v in enum.value}
    return found
