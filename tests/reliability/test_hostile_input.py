"""Hostile input: fuzzing every request field and raw bytes sent as each message type (a few
hundred cases here; `make reliability` runs thousands), and a check that nothing on any input
path can deserialize a pickle.

Every answer must be OK or INVALID_ARGUMENT (never INTERNAL or UNKNOWN, never a hang), and the
server must be alive and serving afterwards.
"""

from __future__ import annotations

import ast
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from reliability_harness import health
from service_harness import Served, open_channel, running, tiny_settings

from bench.hostile_input import (
    ACCEPTABLE,
    METHODS,
    png_header_only,
    raw_caller,
    raw_messages,
    requests,
    status_of,
    valid_bytes,
)
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc

LATENT_SIZE = 4  # the tiny model's
FIELD_CASES = 60  # per method
RAW_CASES = 30  # per method
FUZZ = settings(
    derandomize=True,  # the same cases every run: a failure here is never a fluke
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(tiny_model: Path) -> Iterator[Served]:
    with running(tiny_settings(tiny_model)) as s:
        yield s


@pytest.fixture(scope="module")
def channel(served: Served) -> Iterator[grpc.Channel]:
    with open_channel(served.target) as ch:
        yield ch


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """An answer of INVALID_ARGUMENT that hid a logged traceback would still be a bug."""
    with caplog.at_level(logging.ERROR, logger="service"):
        yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def assert_acceptable(method: str, request: Any, code: grpc.StatusCode, details: str) -> None:
    assert code in ACCEPTABLE, f"{method}({request!r:.300}) -> {code.name}: {details}"
    assert " at 0x" not in details, f"an internal address leaked: {details}"
    assert len(details) < 1000, f"{len(details)} characters of details: {details:.300}"


def assert_alive(channel: grpc.Channel) -> None:
    assert health(channel) == "SERVING"
    reply = vae_pb2_grpc.VaeServiceStub(channel).Sample(
        vae_pb2.SampleRequest(count=2, seed=1), timeout=30
    )
    assert reply.images.tensor.shape == [2, 28, 28]


@pytest.mark.parametrize("method", METHODS)
def test_every_request_field_fuzzed(channel: grpc.Channel, method: str) -> None:
    stub = vae_pb2_grpc.VaeServiceStub(channel)
    call = getattr(stub, method)

    seen: Counter[str] = Counter()

    @settings(FUZZ, max_examples=FIELD_CASES)
    @given(request=requests(LATENT_SIZE)[method])
    def fuzz(request: Any) -> None:
        code, details = status_of(call, request)
        seen[code.name] += 1
        assert_acceptable(method, request, code, details)

    fuzz()
    assert seen["OK"] > 0, f"no fuzzed {method} call got through to the model: {seen}"
    if method != "GetModelInfo":  # it has no fields
        assert seen["INVALID_ARGUMENT"] > 0, seen
    assert_alive(channel)


@pytest.mark.parametrize("method", METHODS)
def test_raw_bytes_as_each_message(channel: grpc.Channel, method: str) -> None:
    call = raw_caller(channel, method)

    @settings(FUZZ, max_examples=RAW_CASES)
    @given(raw=raw_messages(valid_bytes(method, LATENT_SIZE)))
    def fuzz(raw: bytes) -> None:
        assert_acceptable(method, raw, *status_of(call, raw))

    fuzz()
    assert_alive(channel)


def png_input(*files: bytes) -> vae_pb2.ImageInput:
    return vae_pb2.ImageInput(png=vae_pb2.PngImages(images=list(files)))


NASTY = {
    "decompression bomb PNG": vae_pb2.EncodeRequest(
        images=png_input(png_header_only(100_000, 100_000))
    ),
    "PNG claiming 2^31 x 2^31": vae_pb2.ScoreRequest(
        images=png_input(png_header_only(2**31 - 1, 2**31 - 1))
    ),
    "PNG header for 28x28, no pixels": vae_pb2.EncodeRequest(
        images=png_input(png_header_only(28, 28))
    ),
    "PNG signature, broken header": vae_pb2.EncodeRequest(
        images=png_input(b"\x89PNG\r\n\x1a\n" + bytes(30))
    ),
    "70 dimensions": vae_pb2.DecodeRequest(
        latents=vae_pb2.Tensor(shape=[1] * 70, dtype=vae_pb2.DATA_TYPE_FLOAT32, data=bytes(4))
    ),
    "100,000 dimensions (not echoed back)": vae_pb2.DecodeRequest(
        latents=vae_pb2.Tensor(shape=[1] * 100_000, dtype=vae_pb2.DATA_TYPE_FLOAT32)
    ),
    "a zero-sized dimension": vae_pb2.EncodeRequest(
        images=vae_pb2.ImageInput(
            tensor=vae_pb2.Tensor(shape=[1, 0, 2**62], dtype=vae_pb2.DATA_TYPE_UINT8)
        )
    ),
    "shape product overflowing int64": vae_pb2.DecodeRequest(
        latents=vae_pb2.Tensor(shape=[1, 2**62, 2**62], dtype=vae_pb2.DATA_TYPE_FLOAT32)
    ),
    "NaN temperature": vae_pb2.SampleRequest(count=1, temperature=float("nan")),
    "count 2^31 - 1": vae_pb2.SampleRequest(count=2**31 - 1),
    "importance_samples 2^31 - 1": vae_pb2.ScoreRequest(
        images=png_input(png_header_only(28, 28)), importance_samples=2**31 - 1
    ),
    "steps -2^31": vae_pb2.InterpolateRequest(steps=-(2**31)),
}


@pytest.mark.parametrize("case", NASTY)
def test_known_nasty_inputs(channel: grpc.Channel, case: str) -> None:
    request = NASTY[case]
    method = type(request).__name__.removesuffix("Request")
    code, details = status_of(getattr(vae_pb2_grpc.VaeServiceStub(channel), method), request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{case}: {code.name}: {details}"
    assert_acceptable(method, request, code, details)
    assert ":" in details  # the field, then what was expected
    assert_alive(channel)


@pytest.mark.parametrize("method", ["Encode", "Decode"])
def test_oversized_raw_bytes_are_refused_before_parsing(channel: grpc.Channel, method: str) -> None:
    # Garbage the size of a large tensor: INVALID_ARGUMENT, not a crash or a hang.
    code, details = status_of(raw_caller(channel, method), b"\x0a\xff" + bytes(1 << 20))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


# No pickle on any input path: no module that unpickles is imported, and every loader that can
# unpickle is called with the keyword that forbids it, however it is spelled (`np.load`,
# `numpy.load`, `from numpy import load as L`, `getattr(np, "load")`, handed to `map`...).
UNSAFE_MODULES = {
    "pickle", "_pickle", "cPickle", "pickle5", "dill", "shelve", "marshal", "joblib",
    "cloudpickle", "copyreg",
}  # fmt: skip
# Loaders that unpickle unless told not to: the keyword and its one safe value, given as a
# constant at the call itself (a default, a variable or **kwargs is not good enough).
GUARDED = {
    "numpy.load": ("allow_pickle", False),
    "numpy.lib.npyio.load": ("allow_pickle", False),
    "numpy.lib.format.read_array": ("allow_pickle", False),
    "torch.load": ("weights_only", True),
    "torch.serialization.load": ("weights_only", True),
}
# Loaders that unpickle (or run arbitrary constructors) whatever their arguments.
FORBIDDEN = {
    "pandas.read_pickle", "pandas.io.pickle.read_pickle", "numpy.lib.npyio.NpzFile",
    "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all",
    "yaml.load", "yaml.load_all",  # unless Loader=yaml.SafeLoader (or CSafeLoader)
}  # fmt: skip
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}
# Keyword values that turn unpickling on, whoever the callee (an object the scan cannot name).
UNSAFE_KEYWORDS = {("allow_pickle", True), ("weights_only", False)}
IMPORTERS = {"__import__", "importlib.import_module"}


def python_sources() -> list[Path]:
    return sorted(
        p
        for package in ("service", "export", "bench")
        for p in (ROOT / package).rglob("*.py")
        if "proto" not in p.parts and ".venv" not in str(p)
    )


class PickleScan:
    """One file's imports, resolved: `qualified(node)` names what a Name or Attribute refers
    to (`np.load` -> numpy.load when numpy was imported as np), or None."""

    def __init__(self, tree: ast.AST) -> None:
        self.aliases: dict[str, str] = {"__import__": "__import__", "getattr": "getattr"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    local = a.asname or a.name.split(".")[0]
                    self.aliases[local] = a.name if a.asname else local
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def qualified(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self.qualified(node.value)
            return f"{owner}.{node.attr}" if owner else None
        return None


def _constant_keywords(call: ast.Call) -> dict[str | None, object]:
    return {k.arg: k.value.value for k in call.keywords if isinstance(k.value, ast.Constant)}


def _is_unsafe_module(name: str) -> bool:
    return name.split(".")[0] in UNSAFE_MODULES


def unsafe_loads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    scan = PickleScan(tree)
    problems: list[tuple[int, str]] = []
    safe_callees: set[int] = set()  # the func nodes of calls checked here
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [
                (node.lineno, f"imports {a.name}") for a in node.names if _is_unsafe_module(a.name)
            ]
        elif isinstance(node, ast.ImportFrom) and node.module and _is_unsafe_module(node.module):
            problems.append((node.lineno, f"imports from {node.module}"))
        if not isinstance(node, ast.Call):
            continue
        given = _constant_keywords(node)
        problems += [
            (node.lineno, f"{keyword}={value}")
            for keyword, value in UNSAFE_KEYWORDS
            if keyword in given and given[keyword] is value
        ]
        if isinstance(node.func, ast.Attribute) and node.func.attr == "read_pickle":
            problems.append((node.lineno, "read_pickle"))
        name = scan.qualified(node.func)
        args = [a.value for a in node.args if isinstance(a, ast.Constant)]
        if name in IMPORTERS and args and isinstance(args[0], str) and _is_unsafe_module(args[0]):
            problems.append((node.lineno, f"{name}({args[0]!r})"))
        attribute = node.args[1] if len(node.args) > 1 and name == "getattr" else None
        if isinstance(attribute, ast.Constant) and isinstance(attribute.value, str):
            target = f"{scan.qualified(node.args[0])}.{attribute.value}"
            if target in GUARDED or target in FORBIDDEN:
                problems.append((node.lineno, f"getattr for {target}"))
        if name in GUARDED:
            keyword, safe = GUARDED[name]
            safe_callees.add(id(node.func))
            if keyword not in given or given[keyword] is not safe:
                problems.append((node.lineno, f"{name} without {keyword}={safe}"))
        elif name in FORBIDDEN:
            safe_callees.add(id(node.func))
            loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
            if not (
                name in {"yaml.load", "yaml.load_all"}
                and loader is not None
                and scan.qualified(loader) in SAFE_YAML_LOADERS
            ):
                problems.append(
                    (node.lineno, f"{name}: unpickles, or builds any object (yaml: safe_load)")
                )
    for node in ast.walk(tree):  # guarded loaders handed around (map, partial, an alias)
        if isinstance(node, ast.Name | ast.Attribute) and id(node) not in safe_callees:
            name = scan.qualified(node)
            if (name in GUARDED or name in FORBIDDEN) and not isinstance(node.ctx, ast.Store):
                problems.append((node.lineno, f"{name} referenced, not called the safe way"))
    return [f"{path}:{line}: {what}" for line, what in sorted(set(problems))]


def test_nothing_deserializes_pickle() -> None:
    sources = python_sources()
    assert len(sources) > 20
    problems = [p for path in sources for p in unsafe_loads(path)]
    assert not problems, "\n".join(problems)


UNSAFE_SPELLINGS = """\
import pickle
from pickle import loads
import _pickle as cp
import dill, shelve
from joblib import load as jl
import marshal
np.load("z.npy")
np.load("z.npy", allow_pickle=True)
numpy.load("z.npy", allow_pickle=flag)
load("z.npy")
npload("z.npy", **options)
torch.load("m.pt")
torch.load("m.pt", weights_only=False)
tl("m.pt")
serialization.load("m.pt", weights_only=None)
format.read_array(f)
list(map(np.load, files))
loader = numpy.load
functools.partial(torch.load, map_location="cpu")
getattr(np, "load")("z.npy", allow_pickle=False)
pd.read_pickle("frame.pkl")
frame.read_pickle("frame.pkl")
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
__import__("pickle").loads(data)
importlib.import_module("cloudpickle")
anything.load(f, allow_pickle=True)
"""
SAFE_SPELLINGS = """\
np.load("z.npy", allow_pickle=False)
numpy.load("z.npy", allow_pickle=False)
load("z.npy", allow_pickle=False)
torch.load("m.pt", map_location="cpu", weights_only=True)
tl("m.pt", weights_only=True)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
json.load(f)
np.loadtxt("data.csv")
importlib.import_module("numpy")
"""
IMPORTS = """\
import functools, importlib, json
import numpy as np
import numpy
import pandas as pd
import torch
import yaml
from numpy import load
from numpy import load as npload
from numpy.lib import format
from torch import load as tl, serialization
"""


def test_the_pickle_check_catches_unsafe_loads(tmp_path: Path) -> None:
    """Every unsafe spelling is found, on its own line; no safe one is."""
    unsafe = tmp_path / "unsafe.py"
    unsafe.write_text(UNSAFE_SPELLINGS + IMPORTS)
    flagged = {int(p.split(":")[1]) for p in unsafe_loads(unsafe)}
    assert flagged == set(range(1, UNSAFE_SPELLINGS.count("\n") + 1)), unsafe_loads(unsafe)
    safe = tmp_path / "safe.py"
    safe.write_text(SAFE_SPELLINGS + IMPORTS)
    assert unsafe_loads(safe) == []
