"""vae-client as a person runs it, against the real server (the tiny model, latent size 4): every
mistake ends in one line and a documented exit status, never a traceback; the README's tour runs
from nothing; the two interpolation paths write different files; server-chosen seeds fit a
JavaScript Number."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_harness import Served

from service.proto.vae.v1 import vae_pb2, vae_pb2_grpc

VAE_CLIENT = Path(sys.executable).with_name("vae-client")


def vae_client(
    served: Served, *argv: str | Path, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VAE_CLIENT), "--target", served.target, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The whole of stderr, checked to be a single line without a traceback."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["decode", "--z", "0.5,-1.2,..."],
            "argument --z: expected comma-separated numbers such as 0.5,-1.2,3, got '0.5,-1.2,...'",
        ),
        (["decode", "--z"], "argument --z: expected one argument"),
        (["sample", "-n", "many"], "argument -n: invalid int value: 'many'"),
        (["no-such-command"], "argument command: invalid choice: 'no-such-command'"),
    ],
    ids=["z-not-numbers", "z-missing", "n-not-a-number", "unknown-command"],
)
def test_bad_arguments_are_one_line_and_exit_2(
    served: Served, argv: list[str], expected: str
) -> None:
    done = vae_client(served, *argv)
    assert done.returncode == 2
    line = one_line_error(done)
    assert line.startswith("vae-client") and expected in line, line


def test_a_latent_starting_with_a_minus_sign_is_a_value_not_a_flag(served: Served) -> None:
    done = vae_client(served, "decode", "--z", "-0.5,1.2,0,3", "--z", "-1,-1,-1,-1")
    assert done.returncode == 0, done.stderr
    assert "decoded: 2 images" in done.stdout


def test_a_latent_of_the_wrong_size_is_the_servers_one_line_refusal(served: Served) -> None:
    done = vae_client(served, "decode", "--z", "0.5,-1.2")
    assert done.returncode == 1
    assert one_line_error(done) == (
        "vae-client: INVALID_ARGUMENT: latents.shape: expected [N, 4] (the latent size), got [1, 2]"
    )


def test_tls_cert_without_its_key_is_one_line_and_exit_2(served: Served, tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("not used")
    done = vae_client(served, "--tls-cert", cert, "info")
    assert done.returncode == 2
    assert one_line_error(done) == (
        "vae-client: TLS: a client certificate needs its key: give both cert and key, or neither"
    )


def test_missing_input_files_are_one_line(served: Served, tmp_path: Path) -> None:
    done = vae_client(served, "encode", tmp_path / "absent.png")
    assert done.returncode == 1
    assert "absent.png" in one_line_error(done)
    done = vae_client(served, "decode", tmp_path / "absent.npy")
    assert done.returncode == 1
    assert "absent.npy: not a readable .npy array" in one_line_error(done)


def test_output_piped_into_a_closed_pipe_ends_quietly(served: Served) -> None:
    """`vae-client sample | head -c 1`: the reader is gone before the client writes (its read
    end closed at once), so every write fails with EPIPE; the client exits 141, saying nothing."""
    process = subprocess.Popen(
        [str(VAE_CLIENT), "--target", served.target, "sample", "-n", "3", "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    error = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert error == ""


def test_the_readme_tour_runs_from_an_empty_folder(served: Served, tmp_path: Path) -> None:
    """`sample -n 1 --out digit.png` writes a plain 28x28 PNG that `encode` takes, then decode."""
    done = vae_client(
        served, "sample", "-n", "1", "--seed", "7", "--out", "digit.png", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "digit.png") as digit:
        assert (digit.size, digit.mode) == ((28, 28), "L")
    done = vae_client(served, "encode", "digit.png", "--out", "z.npy", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "z.npy").shape == (1, 4)
    done = vae_client(served, "decode", "z.npy", "--out", "decoded.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_linear_and_spherical_interpolations_write_different_files(
    served: Served, tmp_path: Path
) -> None:
    start, end = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(start, np.array([1, 0, 0, 0], np.float32))
    np.save(end, np.array([0, 1, 0, 0], np.float32))
    for extra in ([], ["--slerp"]):
        done = vae_client(served, "interpolate", start, end, "--steps", "3", *extra, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "interpolation-linear.png",
        "interpolation-slerp.png",
    ]


def test_server_chosen_seeds_fit_in_a_javascript_number(
    stub: vae_pb2_grpc.VaeServiceStub,
) -> None:
    """Seeds the server picks are below 2^53, so a double (JavaScript's Number, many JSON
    parsers) holds them exactly and can send them back; 64 draws make a 64-bit choice
    fail this with probability 1 - 2^-704."""
    seeds = [stub.Sample(vae_pb2.SampleRequest(count=1), timeout=10).seed for _ in range(64)]
    assert all(0 <= seed < 2**53 for seed in seeds)
    assert all(float(seed) == seed for seed in seeds)
    assert len(set(seeds)) > 1


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--tls-cert", "server.pem"],
            "vae-serve: invalid settings: tls_cert and tls_key go together: set both for TLS, "
            "or neither",
        ),
        (
            ["--model-version", str(2**63)],
            "vae-serve: invalid settings: model_version: Input should be less than or equal to "
            "9223372036854775807",
        ),
    ],
    ids=["tls-cert-without-key", "version-above-int64"],
)
def test_vae_serve_invalid_settings_are_one_line_and_exit_2(argv: list[str], expected: str) -> None:
    script = Path(sys.executable).with_name("vae-serve")
    done = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert one_line_error(done) == expected
