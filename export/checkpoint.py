"""The checkpoint format that `vae-train` writes and `vae-evaluate` and `vae-export` read: plain
tensors, dicts, lists, numbers and strings (loaded with `weights_only=True`: no foreign
pickles), carrying the config, settings, history, RNG states and a description of the data, so
a checkpoint alone rebuilds the model and finds its data."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.model import VAE, VAEConfig
from vae_data.mnist import DataError, Dataset, load_dataset

CHECKPOINT_FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, not ours, or whose data cannot be found."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Plain tensors, dicts, lists, numbers and strings only, written atomically."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with weights_only=True (no foreign pickles) and check it is one of ours."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first})") from e
    required = {"format", "config", "model", "epoch", "history", "data", "settings"}
    if not isinstance(state, dict) or not required <= set(state):
        raise CheckpointError(f"{path}: not a vae-train checkpoint (it needs {sorted(required)})")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> VAE:
    model = VAE(VAEConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    return model.eval()


def dataset_from_checkpoint(state: dict[str, Any], data_dir: Path | None = None) -> Dataset:
    """The data the checkpoint was trained on (or `data_dir`, if given)."""
    recorded = state["data"].get("data_dir")
    try:
        return load_dataset(data_dir or (Path(recorded) if recorded else None))
    except DataError as e:
        source = state["data"]["source"]
        raise CheckpointError(f"{e} (the checkpoint was trained on {source})") from e


def training_summary(state: dict[str, Any]) -> dict[str, Any]:
    """What a manifest or a results file should say about how a checkpoint was trained."""
    history = state["history"]
    val = history.get("val_loss", [])
    seconds = history.get("train_seconds", [])
    return {
        "data": state["data"],
        "settings": state["settings"],
        "epochs_trained": len(val),
        "best_epoch": int(np.argmin(val)) + 1 if val else 0,
        "best_validation_negative_elbo": min(val) if val else math.nan,
        "seconds_per_epoch": float(np.median(seconds)) if seconds else math.nan,  # load spikes
        "training_seconds": float(np.sum(history.get("seconds", []))),
        "torch_version": state.get("torch_version", ""),
    }
