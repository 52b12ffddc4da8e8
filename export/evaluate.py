"""Measure a trained VAE on the test set: `vae-evaluate` (or `python -m export.evaluate`).

`vae-evaluate` reports, per test image in nats: the negative ELBO with its reconstruction and
KL terms, the number of active latent units, and the importance-weighted estimate of -log p(x)
(Burda et al. 2016) with k samples: k=5000 for reported figures, smaller k for quick runs. The
test set is binarized once with a fixed seed, so figures compare run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from export.checkpoint import (
    CheckpointError,
    dataset_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    training_summary,
)
from export.model import (
    VAE,
    gaussian_kl,
    importance_weighted_nll,
    reconstruction_nll,
)
from vae_data.mnist import binarized_test_set

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: Cov_x(E_q[z_u]) above this counts as active


@torch.no_grad()
def evaluate(
    model: VAE, x: torch.Tensor, k: int, *, seed: int = 0, progress: bool = True
) -> dict[str, float]:
    """Test-set figures for binarized images `x` [N, 784]; the global RNG is left untouched."""
    model.eval()
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, log_variance = model.encoder(x)
        z = model.reparameterize(mean, log_variance)
        rec = reconstruction_nll(model.decoder(z), x)
        kl = gaussian_kl(mean, log_variance)
        active = int((mean.var(dim=0) > ACTIVE_UNIT_THRESHOLD).sum())
        # k samples for each of `batch` images at a time: [chunk, batch, 784] stays ~40 MB
        batch = max(1, min(len(x), 25_000 // min(k, 500)))
        iw = torch.cat(
            [
                importance_weighted_nll(model, x[i : i + batch], k)
                for i in tqdm(
                    range(0, len(x), batch),
                    desc=f"IW k={k}",
                    leave=False,
                    disable=None if progress else True,
                )
            ]
        )
    return {
        "negative_elbo": float((rec + kl).mean()),
        "reconstruction": float(rec.mean()),
        "kl": float(kl.mean()),
        "active_units": float(active),
        "iw_nll": float(iw.mean()),
        "iw_nll_stderr": float(iw.std() / len(iw) ** 0.5),  # spread over the test images
        "iw_k": float(k),
        "test_images": float(len(x)),
        "evaluation_seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------- command line


def evaluate_checkpoint(
    checkpoint: Path, k: int, data_dir: Path | None = None, seed: int = 0
) -> dict[str, Any]:
    """Load a checkpoint and its data, evaluate, and say how the model was trained."""
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state)
    dataset = dataset_from_checkpoint(state, data_dir)
    x = torch.from_numpy(binarized_test_set(dataset))
    print(f"evaluating {checkpoint} on {len(x)} test images with k={k}", flush=True)
    metrics = evaluate(model, x, k, seed=seed)
    return {
        "metrics": metrics,
        "training": training_summary(state),
        "config": state["config"],
        "checkpoint": str(checkpoint),
        "test_data": dataset.description,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()),
        },
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vae-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, help="default: the data the checkpoint was trained on")
    p.add_argument("--k", type=int, default=5000, help="importance samples (5000 for reports)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 on free cores)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        results = evaluate_checkpoint(args.checkpoint, args.k, args.data_dir, args.seed)
    except CheckpointError as e:
        raise SystemExit(f"vae-evaluate: {e}") from None
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
