"""The three commands end to end on a tiny config: vae-train, vae-evaluate, vae-export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from export.manifest import load_verified, resolve_version


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_train_evaluate_export(tmp_path: Path) -> None:
    out = tmp_path / "run"
    tiny = ["--latent-size", "2", "--hidden-sizes", "32", "--batch-size", "256", "--threads", "1"]
    trained = run("export.train", "--out", str(out), "--epochs", "2", *tiny)
    assert "embedded MNIST subset" in trained.stdout
    assert "s/epoch" in trained.stdout and "done: best validation" in trained.stdout
    assert (out / "manifold.png").is_file()  # drawn for a 2-D latent

    refused = run("export.train", "--out", str(out), "--resume", "--latent-size", "3", check=False)
    assert refused.returncode != 0 and "incompatible run" in refused.stderr

    results = tmp_path / "eval.json"
    run("export.evaluate", "--checkpoint", str(out / "best.pt"), "--k", "10", "--out", str(results))
    figures = json.loads(results.read_text())
    metrics = figures["metrics"]
    assert metrics["iw_k"] == 10 and metrics["test_images"] == 500
    assert metrics["negative_elbo"] == pytest.approx(metrics["reconstruction"] + metrics["kl"])
    assert metrics["iw_nll"] < metrics["negative_elbo"]
    assert metrics["kl"] > 0 and 0 <= metrics["active_units"] <= 2
    assert figures["training"]["epochs_trained"] == 2

    repo = tmp_path / "models"
    exported = run(
        "export.onnx_export",
        "--checkpoint",
        str(out / "best.pt"),
        "--model-repo",
        str(repo),
        "--name",
        "t",
        "--metrics",
        str(results),
    )
    manifest = load_verified(resolve_version(repo, "t"))
    assert str(resolve_version(repo, "t")) in exported.stdout
    assert manifest.latent_size == 2
    assert manifest.metrics["iw_nll"] == figures["metrics"]["iw_nll"]
    assert manifest.training["data"]["source"].startswith("embedded")
    assert manifest.training["epochs_trained"] == 2
    assert manifest.training["settings"]["epochs"] == 2
    assert manifest.training["settings"]["batch_size"] == 256
    assert manifest.parity_check["encoder_inputs"].startswith("the first 257 test images")


@pytest.mark.parametrize("module", ["export.train", "export.evaluate", "export.onnx_export"])
def test_a_missing_checkpoint_is_one_line_not_a_traceback(module: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    flags = ["--resume", "--out", str(tmp_path)] if module == "export.train" else []
    if module != "export.train":
        flags = ["--checkpoint", str(missing)]
    else:
        (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    result = run(module, *flags, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "checkpoint" in line, line
