"""A model repository that tries to trick the server (issue 13, items 8, 9 and 10), against the
real server polling its repository (and a real `vae-serve` for start-up): files named outside
the version folder, symbolic links and FIFOs, networks whose shapes do not fit the service,
version folder names that are not canonical numbers, a manifest naming another model, weights
in external-data files, an emptied repository.

Every bad version is refused with a one-line reason in the log, counted, and the live version
keeps serving; at start, the process exits 1 with one line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reliability_harness import MODEL, POLL, WITH_LATENTS, metric, wait_until
from service_harness import Served, open_channel, running, tiny_settings

from export.manifest import MANIFEST_FILE, sha256_of
from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc
from vae_client.tensors import from_tensor

LATENT = 4  # the tiny model's
Damage = Callable[[Path, dict[str, Any]], None]


@pytest.fixture
def served(repo: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Served]:
    """The server on version 1, polling the repository, every log record captured."""
    settings = tiny_settings(repo / MODEL / "1", reload_interval=POLL)
    with caplog.at_level(logging.INFO), running(settings) as served:
        yield served


def stage(repo: Path, folder: str, damage: Damage, *, version: int = 2) -> Path:
    """A copy of version 1 as `<repo>/tiny-vae/<folder>`, its manifest saying `version`,
    changed by `damage(directory, manifest)`, moved in with one rename."""
    staging = repo / f".staging-{time.monotonic_ns()}"
    shutil.copytree(repo / MODEL / "1", staging)
    manifest = json.loads((staging / MANIFEST_FILE).read_text())
    manifest["version"] = version
    damage(staging, manifest)
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest))
    final = repo / MODEL / folder
    staging.rename(final)
    return final


def unchanged(directory: Path, manifest: dict[str, Any]) -> None:
    pass


def network(
    input_name: str,
    input_width: int,
    output_names: list[str],
    output_width: int,
    *,
    declared_width: int | str | None = None,
    scale: float = 0.01,
) -> bytes:
    """A serialized ONNX graph: [N, input_width] -> each output [N, output_width] by a MatMul,
    its outputs declared [N, declared_width] (default: the real width)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for i, name in enumerate(output_names):
        w = (rng.standard_normal((input_width, output_width)) * scale).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [input_name, f"w{i}"], [name]))
    declared = output_width if declared_width is None else declared_width
    graph = helper.make_graph(
        nodes,
        "test-network",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", input_width])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", declared])
            for n in output_names
        ],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def replace(directory: Path, manifest: dict[str, Any], role: str, graph: bytes) -> None:
    """The `role` network's file replaced by `graph`, the manifest vouching for it (its outputs
    those the graph has: a decoder without the uint8 image output is what older exports
    wrote)."""
    import onnx

    path = directory / manifest[role]["path"]
    path.write_bytes(graph)
    manifest[role]["sha256"] = sha256_of(path)
    names = [output.name for output in onnx.load_from_string(graph).graph.output]
    manifest[role]["outputs"] = [t for t in manifest[role]["outputs"] if t["name"] in names]


def model_info(served: Served) -> vae_pb2.ModelInfo:
    with open_channel(served.target) as channel:
        return vae_pb2_grpc.VaeServiceStub(channel).GetModelInfo(
            vae_pb2.GetModelInfoRequest(), timeout=10
        )


def sample_latent_size(served: Served) -> int:
    with open_channel(served.target) as channel:
        reply = vae_pb2_grpc.VaeServiceStub(channel).Sample(WITH_LATENTS, timeout=30)
    return int(reply.latents.shape[1])


def failures(served: Served) -> float:
    return metric(served, "vae_model_reloads_total", result="failure")


def assert_rejected_and_version_1_serves(
    served: Served, caplog: pytest.LogCaptureFixture, reason: str
) -> str:
    """Wait for the one rejection; check its log line and that version 1 still answers."""
    wait_until(lambda: failures(served) == 1, "the bad version to be rejected")
    rejected = [r for r in caplog.records if "reload rejected" in r.getMessage()]
    assert len(rejected) == 1, caplog.messages
    line = rejected[0].getMessage()
    assert "\n" not in line and rejected[0].exc_info is None
    assert reason in line, line
    assert line.endswith("; still serving version 1")
    assert model_info(served).version == 1
    assert sample_latent_size(served) == LATENT
    assert metric(served, "vae_model_reloads_total", result="success") == 0
    return line


# Item 8: files outside the version folder


def named(path: str) -> Damage:
    def damage(directory: Path, manifest: dict[str, Any]) -> None:
        manifest["decoder"]["path"] = path

    return damage


def linked_outside(directory: Path, manifest: dict[str, Any]) -> None:
    """decoder.onnx a symbolic link to a valid copy outside the repository, same sha256."""
    outside = directory.parent.parent / "outside-decoder.onnx"
    shutil.copy(directory / "decoder.onnx", outside)
    (directory / "decoder.onnx").unlink()
    (directory / "decoder.onnx").symlink_to(outside)


def fifo(directory: Path, manifest: dict[str, Any]) -> None:
    """decoder.onnx a FIFO: opening it for reading would wait for a writer forever."""
    (directory / "decoder.onnx").unlink()
    os.mkfifo(directory / "decoder.onnx")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            named("../../../../../../etc/passwd"),
            "decoder.path '../../../../../../etc/passwd' is not a plain file name inside the "
            "version folder; refused",
        ),
        (
            named("/proc/self/environ"),
            "decoder.path '/proc/self/environ' is not a plain file name inside the version "
            "folder; refused",
        ),
        (named("..\\decoder.onnx"), "is not a plain file name inside the version folder"),
        (
            linked_outside,
            "the decoder file named in the manifest lies outside the model repository",
        ),
        (fifo, "the decoder file named in the manifest is not a regular file; refused"),
    ],
    ids=["dot-dot", "absolute", "backslash", "symlink-outside", "fifo"],
)
def test_files_outside_the_version_folder_are_never_opened(
    repo: Path,
    served: Served,
    caplog: pytest.LogCaptureFixture,
    damage: Damage,
    reason: str,
) -> None:
    stage(repo, "2", damage)
    line = assert_rejected_and_version_1_serves(served, caplog, reason)
    assert "sha256" not in line  # nothing outside was hashed, so no hash of it is printed


def test_a_version_folder_linked_outside_the_repository_is_refused(
    repo: Path, tmp_path: Path, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    good = stage(repo, "2", unchanged)
    good.rename(elsewhere / "2")  # a complete, valid version 2, outside
    (repo / MODEL / "2").symlink_to(elsewhere / "2", target_is_directory=True)
    assert_rejected_and_version_1_serves(
        served, caplog, "the version folder lies outside the model repository"
    )


def test_symbolic_links_inside_the_repository_are_followed(repo: Path, served: Served) -> None:
    """As a Kubernetes ConfigMap or a deduplicating copy lays files out: links that stay inside
    the repository are fine."""

    def link_to_version_1(directory: Path, manifest: dict[str, Any]) -> None:
        (directory / "decoder.onnx").unlink()
        (directory / "decoder.onnx").symlink_to(Path("..") / "1" / "decoder.onnx")

    stage(repo, "2", link_to_version_1)
    wait_until(lambda: model_info(served).version == 2, "version 2 to go live")
    assert failures(served) == 0


# Item 9: networks whose shapes do not fit


def decoder_of_width_100(directory: Path, manifest: dict[str, Any]) -> None:
    replace(directory, manifest, "decoder", network("latent", LATENT, ["logits"], 100))


def decoder_of_one_row(directory: Path, manifest: dict[str, Any]) -> None:
    """A decoder that answers one row whatever the batch (the mean over it): its declared shape
    fits, so only running it shows the problem."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((LATENT, 784), 0.01, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["latent", "w"], ["rows"]),
            helper.make_node("ReduceMean", ["rows"], ["logits"], axes=[0], keepdims=1),
        ],
        "one-row",
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["N", LATENT])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 784])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    replace(directory, manifest, "decoder", model.SerializeToString())


def model_of_32x32(directory: Path, manifest: dict[str, Any]) -> None:
    """A consistent model for 32x32 images: graphs and manifest agree, the service does not."""
    encoder = network("image", 1024, ["mean", "log_variance"], LATENT)
    replace(directory, manifest, "encoder", encoder)
    replace(directory, manifest, "decoder", network("latent", LATENT, ["logits"], 1024))
    manifest["image_shape"] = [32, 32]
    manifest["encoder"]["inputs"][0]["shape"] = ["N", 1024]
    manifest["decoder"]["outputs"][0]["shape"] = ["N", 1024]


def decoder_with_another_image(directory: Path, manifest: dict[str, Any]) -> None:
    """The decoder's `image` output, uint8 of the right shape, but not its logits rounded."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(directory / "decoder.onnx")
    cast = next(node for node in model.graph.node if node.output[0] == "image")
    cast.input[0] = "image_probabilities"  # p itself cast: all 0 (and 1 at p = 1)
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.UINT8
    replace(directory, manifest, "decoder", model.SerializeToString())


def encoder_of_8_latents(directory: Path, manifest: dict[str, Any]) -> None:
    replace(directory, manifest, "encoder", network("image", 784, ["mean", "log_variance"], 8))


def decoder_overflowing_at_the_latent_limit(directory: Path, manifest: dict[str, Any]) -> None:
    """Finite near the origin, infinite (then NaN) far from it: what latents of 3.4e38 did."""
    graph = network("latent", LATENT, ["logits"], 784, scale=1e36)
    replace(directory, manifest, "decoder", graph)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            decoder_of_width_100,
            "decoder.onnx: the decoder graph's logits is tensor(float) ['N', 100], this service "
            "needs tensor(float) [N, 784]",
        ),
        (
            decoder_of_one_row,
            "warm-up failed: decoder: a run on a batch of 2 returned [('float32', (1, 784))], "
            "this service needs [('float32', (2, 784))]",
        ),
        (model_of_32x32, "the model is for [32, 32] images, this service serves [28, 28]"),
        (
            decoder_with_another_image,
            "warm-up failed: decoder: its 'image' output is not round(255 * sigmoid(logits)) "
            "as uint8",
        ),
        (
            encoder_of_8_latents,
            "encoder.onnx: the encoder graph's mean is tensor(float) ['N', 8], this service "
            "needs tensor(float) [N, 4]",
        ),
        (
            decoder_overflowing_at_the_latent_limit,
            "warm-up failed: decoder: non-finite values for latents of +-10000",
        ),
    ],
    ids=[
        "decoder-100",
        "decoder-one-row",
        "32x32",
        "another-image",
        "encoder-8-latents",
        "overflows",
    ],
)
def test_networks_that_do_not_fit_the_service_are_refused_at_reload(
    repo: Path,
    served: Served,
    caplog: pytest.LogCaptureFixture,
    damage: Damage,
    reason: str,
) -> None:
    stage(repo, "2", damage)
    assert_rejected_and_version_1_serves(served, caplog, reason)


def test_a_version_without_the_image_output_serves_uint8_rounded_in_numpy(
    repo: Path, served: Served
) -> None:
    """Versions exported before the decoder had its uint8 output still serve every format: the
    server rounds the probabilities itself, to the same images but for a level here and
    there."""
    import onnx

    def without_image(directory: Path, manifest: dict[str, Any]) -> None:
        model = onnx.load(directory / "decoder.onnx")
        del model.graph.output[1]  # ONNX Runtime prunes the nodes no output needs
        replace(directory, manifest, "decoder", model.SerializeToString())

    request = vae_pb2.SampleRequest(count=64, seed=5, format=vae_pb2.IMAGE_FORMAT_UINT8)
    with open_channel(served.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        graph = from_tensor(stub.Sample(request, timeout=30).images.tensor)
        stage(repo, "2", without_image)
        wait_until(lambda: model_info(served).version == 2, "version 2 to go live")
        numpy = from_tensor(stub.Sample(request, timeout=30).images.tensor)
    assert graph.dtype == numpy.dtype == np.uint8 and graph.shape == numpy.shape == (64, 28, 28)
    difference = np.abs(graph.astype(np.int16) - numpy)
    assert difference.max() <= 1 and np.count_nonzero(difference) <= 2
    assert failures(served) == 0


# Item 10: version names, the manifest's name, external data, an empty repository


def test_non_canonical_version_names_are_ignored_once_and_block_nothing(
    repo: Path, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """`²` passes str.isdigit() but not int(); `٣` is an Arabic-Indic 3; `02` would have been
    version 2; 2^63 does not fit ModelInfo.version. Each is a complete, valid copy."""
    odd = ["²", "٣", "02", str(2**63)]
    for i, name in enumerate(odd):
        stage(repo, name, unchanged, version=2 + i)

    def ignored() -> list[str]:
        return [m for m in caplog.messages if m.startswith("ignoring ")]

    wait_until(lambda: len(ignored()) == len(odd), "each odd name to be reported")
    time.sleep(10 * POLL)  # ten more polls: still one line each
    assert len(ignored()) == len(odd)
    for name in odd:
        assert sum(f"/{ascii(name)[1:-1]}'" in m for m in ignored()) == 1, ignored()
    assert "not a version folder (expected a folder named by a number from 1 to " in ignored()[0]
    assert not [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]
    assert failures(served) == 0 and model_info(served).version == 1

    stage(repo, "2", unchanged)  # later reloads are not blocked
    wait_until(lambda: model_info(served).version == 2, "version 2 to go live")


def test_the_largest_int64_version_is_served(repo: Path, served: Served) -> None:
    largest = 2**63 - 1
    stage(repo, str(largest), unchanged, version=largest)
    wait_until(lambda: model_info(served).version == largest, "the int64-max version to go live")


def test_a_manifest_naming_another_model_is_refused(
    repo: Path, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    def rename(directory: Path, manifest: dict[str, Any]) -> None:
        manifest["name"] = "other-vae"

    stage(repo, "2", rename)
    assert_rejected_and_version_1_serves(
        served, caplog, "the manifest names model 'other-vae', the folder 'tiny-vae'"
    )


def external_weights(directory: Path, manifest: dict[str, Any]) -> None:
    """The decoder's weights moved to decoder.weights: the manifest's sha256 of decoder.onnx
    matches, and the weights file is covered by no checksum at all."""
    import onnx
    from onnx import external_data_helper

    path = directory / "decoder.onnx"
    model = onnx.load(str(path))
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="decoder.weights", size_threshold=0
    )
    onnx.save_model(model, str(path))
    assert (directory / "decoder.weights").stat().st_size > 0
    manifest["decoder"]["sha256"] = sha256_of(path)


def test_weights_in_external_data_files_are_refused(
    repo: Path, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    stage(repo, "2", external_weights)
    assert_rejected_and_version_1_serves(
        served, caplog, "are kept in external data files, outside the manifest's sha256"
    )


def test_an_emptied_repository_is_reported_once(
    repo: Path, tmp_path: Path, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    keep = tmp_path / "version-1"
    shutil.copytree(repo / MODEL / "1", keep)
    shutil.rmtree(repo / MODEL / "1")  # the live version stays loaded
    wait_until(lambda: failures(served) == 1, "the empty repository to be reported")
    time.sleep(10 * POLL)  # ten more polls: still once
    assert failures(served) == 1
    nothing = [m for m in caplog.messages if "nothing to load" in m]
    assert len(nothing) == 1 and "no model versions found" in nothing[0], nothing
    assert model_info(served).version == 1 and sample_latent_size(served) == LATENT

    shutil.copytree(keep, repo / MODEL / ".incoming")
    manifest = json.loads((repo / MODEL / ".incoming" / MANIFEST_FILE).read_text())
    manifest["version"] = 2
    (repo / MODEL / ".incoming" / MANIFEST_FILE).write_text(json.dumps(manifest))
    (repo / MODEL / ".incoming").rename(repo / MODEL / "2")
    wait_until(lambda: model_info(served).version == 2, "the new version to go live")


# At start: exit 1 with one line


def vae_serve(repo: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("vae-serve")
    return subprocess.run(
        [
            str(script),
            f"--model-repo={repo}",
            f"--model-name={MODEL}",
            "--host=127.0.0.1",
            "--port=0",
            "--metrics-port=-1",
            "--provider=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("prepare", "reason"),
    [
        (
            lambda repo: stage(repo, "²", unchanged),
            "/tiny-vae: no model versions found",
        ),
        (
            lambda repo: stage(repo, "2", named("../../../../../../etc/passwd")),
            "is not a plain file name inside the version folder; refused",
        ),
        (
            lambda repo: stage(repo, "2", decoder_of_width_100),
            "this service needs tensor(float) [N, 784]",
        ),
    ],
    ids=["only-an-odd-name", "path-outside", "decoder-100"],
)
def test_start_up_with_a_bad_repository_exits_1_with_one_line(
    repo: Path, prepare: Callable[[Path], object], reason: str
) -> None:
    prepare(repo)
    if reason.endswith("no model versions found"):
        shutil.rmtree(repo / MODEL / "1")
    done = vae_serve(repo)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(errors) == 1 and reason in errors[0], done.stderr
