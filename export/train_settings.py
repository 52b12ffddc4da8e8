"""What a training run is: its settings (the learning-rate and KL-weight schedules included)
and the data it reads, and the rule for a resume: a checkpoint continues only the run it came
from (export/train.py runs the loop)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.model import VAEConfig
from vae_data.mnist import Dataset


class TrainingError(Exception):
    """A run that cannot go on as asked (a resume from a missing or incompatible checkpoint)."""


@dataclass(frozen=True)
class TrainSettings:
    """How a run trains; every field is also a `vae-train` flag of the same name."""

    epochs: int = 200  # the embedded 4,000 digits: ~0.2 s an epoch on 2 cores
    batch_size: int = 128
    lr: float = 1e-3  # Adam; cosine-decayed to lr * final_lr_fraction over `epochs`
    final_lr_fraction: float = 0.1
    kl_warmup_epochs: int = 10  # KL weight rises linearly 0 -> 1 (Sønderby et al. 2016)
    seed: int = 0
    # torch intra-op threads. 1: OpenMP's spinning threads run 10-20x slower when the cores are
    # shared (a CI box, a busy laptop); 2 is faster only on free cores. Same results either way.
    threads: int = 1

    def lr_at(self, epoch: int) -> float:
        """Cosine decay over the planned epochs (epoch counts from 0)."""
        progress = min(epoch / max(self.epochs - 1, 1), 1.0)
        floor = self.lr * self.final_lr_fraction
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def kl_weight_at(self, epoch: int, step: float) -> float:
        """The KL weight at `epoch` + `step` (fraction of the epoch done)."""
        if self.kl_warmup_epochs <= 0:
            return 1.0
        return min((epoch + step) / self.kl_warmup_epochs, 1.0)


def data_record(dataset: Dataset, data_dir: Path | None) -> dict[str, Any]:
    """What a checkpoint records about its data: enough to tell a resume on other data, and
    for `vae-evaluate` and `vae-export` to find the same data again."""
    return {**dataset.description, "data_dir": str(data_dir.resolve()) if data_dir else None}


def check_compatible(
    state: dict[str, Any], config: VAEConfig, settings: TrainSettings, data: dict[str, Any]
) -> None:
    """Refuse a resume that would silently continue a different run."""
    problems = []
    saved_config = VAEConfig.from_dict(state["config"])
    if saved_config != config:
        problems.append(f"model config: checkpoint has {saved_config}, asked for {config}")
    saved = TrainSettings(**state["settings"])
    for name in ("batch_size", "lr", "final_lr_fraction", "kl_warmup_epochs", "seed"):
        if getattr(saved, name) != getattr(settings, name):
            was, now = getattr(saved, name), getattr(settings, name)
            problems.append(f"{name}: checkpoint has {was}, asked for {now}")
    for key in ("source", "train", "validation", "test"):
        if state["data"].get(key) != data.get(key):
            was, now = state["data"].get(key), data.get(key)
            problems.append(f"data {key}: checkpoint has {was!r}, asked for {now!r}")
    if problems:
        raise TrainingError(
            "cannot resume: the checkpoint is from an incompatible run:\n  "
            + "\n  ".join(problems)
            + "\n(drop --resume, or choose another --out, to start a new run)"
        )
