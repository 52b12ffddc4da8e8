"""One epoch of training: a pass over the training set in a random order, each image binarized
afresh (dynamic binarization), then the negative ELBO on the validation set (export/train.py runs
the epochs)."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from export.model import VAE, negative_elbo
from export.train_settings import TrainSettings


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 784] -> float32 probabilities in [0, 1]."""
    return torch.from_numpy(images).float().div_(255)


def train_epoch(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    probabilities: torch.Tensor,
    settings: TrainSettings,
    epoch: int,
    generator: torch.Generator,
) -> dict[str, float]:
    """One pass in a random order, each image binarized afresh. Returns mean loss/rec/kl."""
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = settings.lr_at(epoch)
    n = len(probabilities)
    order = torch.randperm(n, generator=generator)
    steps = math.ceil(n / settings.batch_size)
    totals = torch.zeros(3, dtype=torch.float64)
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{settings.epochs}", leave=False, disable=None)
    for step in bar:
        index = order[step * settings.batch_size : (step + 1) * settings.batch_size]
        batch = probabilities[index]  # dynamic binarization: x ~ Bernoulli(intensity)
        x = (torch.rand(batch.shape, generator=generator) < batch).float()  # 2x torch.bernoulli
        logits, mean, log_variance = model(x)
        loss, rec, kl = negative_elbo(logits, x, mean, log_variance)
        beta = settings.kl_weight_at(epoch, step / steps)
        objective = (rec + beta * kl).mean()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        with torch.no_grad():
            totals += torch.stack([loss.sum(), rec.sum(), kl.sum()]).double()
            seen = min((step + 1) * settings.batch_size, n)
            if not bar.disable and step % 10 == 0:
                avg = (totals / seen).tolist()
                bar.set_postfix_str(f"loss {avg[0]:.2f}  rec {avg[1]:.2f}  kl {avg[2]:.2f}")
    loss_sum, rec_sum, kl_sum = (totals / n).tolist()
    return {"loss": loss_sum, "rec": rec_sum, "kl": kl_sum}


@torch.no_grad()
def validate(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Negative ELBO (one posterior sample an image) on an already binarized set."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        logits, mean, log_variance = model(batch)
        loss, rec, kl = negative_elbo(logits, batch, mean, log_variance)
        totals += torch.stack([loss.sum(), rec.sum(), kl.sum()]).double()
    loss_sum, rec_sum, kl_sum = (totals / len(x)).tolist()
    return {"loss": loss_sum, "rec": rec_sum, "kl": kl_sum}
