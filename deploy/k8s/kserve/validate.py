"""Validate the KServe example against KServe's own CRDs, offline: each object against its
CRD's openAPIV3Schema (jsonschema), and, as `kubectl apply --validate=strict` would, no field
the schema does not know (the API server would silently prune it).

    python deploy/k8s/kserve/validate.py deploy/k8s/kserve/inferenceservice.yaml \
        <kserve>/config/crd/full/serving.kserve.io_inferenceservices.yaml \
        <kserve>/config/crd/full/serving.kserve.io_servingruntimes.yaml

Exits 1 naming the first problem of each object.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

Schema = dict[str, Any]


def crd_schemas(paths: list[Path]) -> dict[tuple[str, str], Schema]:
    """(apiVersion, kind) -> openAPIV3Schema of every version of every CRD in `paths`."""
    schemas = {}
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                spec = doc["spec"]
                for version in spec["versions"]:
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def unknown_fields(node: Any, schema: Schema, where: str) -> Iterator[str]:
    if isinstance(node, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") or "properties" not in schema:
            values = schema.get("additionalProperties")
            if isinstance(values, dict):
                for key, value in node.items():
                    yield from unknown_fields(value, values, f"{where}.{key}")
            return
        for key, value in node.items():
            if key not in schema["properties"]:
                yield f"{where}.{key}"
            else:
                yield from unknown_fields(value, schema["properties"][key], f"{where}.{key}")
    elif isinstance(node, list) and "items" in schema:
        for i, value in enumerate(node):
            yield from unknown_fields(value, schema["items"], f"{where}[{i}]")


def problems(manifest: Path, crds: list[Path]) -> list[str]:
    schemas = crd_schemas(crds)
    found = []
    for doc in yaml.safe_load_all(manifest.read_text()):
        schema = schemas.get((doc["apiVersion"], doc["kind"]))
        if schema is None:
            found.append(f"{doc['kind']} {doc['apiVersion']}: no CRD given for it")
            continue
        # metadata is the API server's ObjectMeta, not described by the CRD.
        body = {k: v for k, v in doc.items() if k != "metadata"}
        properties = {k: v for k, v in schema["properties"].items() if k != "metadata"}
        try:
            jsonschema.validate(body, {**schema, "properties": properties})
        except jsonschema.ValidationError as e:
            found.append(f"{doc['kind']}: {e.json_path}: {e.message}")
        found += [f"{doc['kind']}: unknown field {f}" for f in unknown_fields(body, schema, "")]
    return found


def main() -> None:
    manifest, *crds = (Path(a) for a in sys.argv[1:])
    found = problems(manifest, crds)
    for problem in found:
        print(problem)
    print(f"{manifest}: {'invalid' if found else 'valid'} against {len(crds)} CRD file(s)")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
