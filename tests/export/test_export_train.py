"""Training: it learns, it is deterministic for a seed, and a resume is seamless or refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from export.checkpoint import load_checkpoint, training_summary
from export.model import VAEConfig
from export.train import TrainingError, TrainSettings, train
from vae_data.mnist import Dataset


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tiny_run_lowers_the_validation_loss(trained: tuple[Path, dict[str, Any]]) -> None:
    out, state = trained
    val = state["history"]["val_loss"]
    assert len(val) == state["settings"]["epochs"]
    assert min(val) < val[0] - 20, val  # nats per image
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == int(torch.tensor(val).argmin()) + 1
    assert "optimizer" not in best and "optimizer" in load_checkpoint(out / "last.pt")
    summary = training_summary(best)
    assert summary["epochs_trained"] == len(val) and summary["seconds_per_epoch"] > 0
    for name in ("reconstructions.png", "samples.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_hold_plain_data_only(trained: tuple[Path, dict[str, Any]]) -> None:
    out, _ = trained
    state = torch.load(out / "last.pt", weights_only=True)  # would raise on foreign objects
    assert VAEConfig.from_dict(state["config"]) == VAEConfig(4, (64,), "gelu")
    assert state["data"]["source"].startswith("embedded") and state["data"]["data_dir"] is None


@pytest.fixture(scope="module")
def quick(tiny_settings: TrainSettings) -> TrainSettings:
    return replace(tiny_settings, epochs=3)


def test_deterministic_for_a_seed(
    tmp_path: Path, small_dataset: Dataset, tiny_config: VAEConfig, quick: TrainSettings
) -> None:
    a = train(quick, tiny_config, small_dataset, tmp_path / "a")
    b = train(quick, tiny_config, small_dataset, tmp_path / "b")
    assert same_weights(a["model"], b["model"])
    assert a["history"]["val_loss"] == b["history"]["val_loss"]
    c = train(replace(quick, seed=1), tiny_config, small_dataset, tmp_path / "c")
    assert not same_weights(a["model"], c["model"])


def test_resume_continues_as_if_never_stopped(
    tmp_path: Path, small_dataset: Dataset, tiny_config: VAEConfig, quick: TrainSettings
) -> None:
    whole = train(quick, tiny_config, small_dataset, tmp_path / "whole")
    first = train(quick, tiny_config, small_dataset, tmp_path / "split", stop_after=1)
    assert first["epoch"] == 1
    resumed = train(quick, tiny_config, small_dataset, tmp_path / "split", resume=True)
    assert resumed["epoch"] == quick.epochs
    assert same_weights(whole["model"], resumed["model"])
    assert whole["history"]["val_loss"] == resumed["history"]["val_loss"]


def test_incompatible_resume_is_refused(
    tmp_path: Path, small_dataset: Dataset, tiny_config: VAEConfig, quick: TrainSettings
) -> None:
    train(quick, tiny_config, small_dataset, tmp_path, stop_after=1)
    other = replace(tiny_config, latent_size=8)
    with pytest.raises(TrainingError, match=r"incompatible run:\n  model config: .*latent_size=4"):
        train(quick, other, small_dataset, tmp_path, resume=True)
    with pytest.raises(TrainingError, match="batch_size: checkpoint has 50, asked for 64"):
        train(replace(quick, batch_size=64), tiny_config, small_dataset, tmp_path, resume=True)
    with pytest.raises(TrainingError, match="does not exist"):
        train(quick, tiny_config, small_dataset, tmp_path / "empty", resume=True)
