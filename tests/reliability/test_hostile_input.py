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


# No pickle on any input path: every loader of files or bytes is called the safe way.
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "shelve", "marshal", "joblib", "cloudpickle"}
SAFE_KEYWORDS = {("np", "load"): ("allow_pickle", False), ("torch", "load"): ("weights_only", True)}


def python_sources() -> list[Path]:
    return sorted(
        p
        for package in ("service", "export", "bench")
        for p in (ROOT / package).rglob("*.py")
        if "proto" not in p.parts and ".venv" not in str(p)
    )


def unsafe_loads(path: Path) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            problems += [
                f"{path}:{node.lineno}: imports {n}"
                for n in names
                if n and n.split(".")[0] in UNSAFE_MODULES
            ]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            key = (owner.id if isinstance(owner, ast.Name) else "", node.func.attr)
            if key in SAFE_KEYWORDS:
                keyword, safe = SAFE_KEYWORDS[key]
                given_values = {
                    k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)
                }
                if given_values.get(keyword) is not safe:
                    problems.append(
                        f"{path}:{node.lineno}: {'.'.join(key)} without {keyword}={safe}"
                    )
            if key[1] == "load" and key[0] == "yaml":
                problems.append(f"{path}:{node.lineno}: yaml.load (use yaml.safe_load)")
    return problems


def test_nothing_deserializes_pickle() -> None:
    sources = python_sources()
    assert len(sources) > 20
    problems = [p for path in sources for p in unsafe_loads(path)]
    assert not problems, "\n".join(problems)


def test_the_pickle_check_catches_unsafe_loads(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.py"
    unsafe.write_text(
        "import pickle\nimport numpy as np\nimport torch\nimport yaml\n"
        "np.load('z.npy')\nnp.load('z.npy', allow_pickle=True)\ntorch.load('m.pt')\n"
        "yaml.load(open('c.yaml'))\nnp.load('z.npy', allow_pickle=False)\n"
    )
    problems = unsafe_loads(unsafe)
    assert len(problems) == 5, problems
