"""Train the VAE on the negative ELBO: `vae-train` (or `python -m export.train`).

Reads top to bottom: the loop, then the command line. The run's settings and the rule for a
resume are `export/train_settings.py`, one epoch `export/epoch.py`, the checkpoint format
`export/checkpoint.py`, the pictures `export/pictures.py`. Training uses dynamic binarization
(every image is redrawn as Bernoulli(intensity) each time it is used); validation uses one fixed
binarization, so its ELBO is comparable epoch to epoch. The run is deterministic for a seed,
including across a resume: the checkpoint carries the RNG states along with the model,
optimizer, config, history and a description of the data.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

from export.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    training_summary,
)
from export.epoch import images_to_tensor, train_epoch, validate
from export.model import ACTIVATIONS, VAE, VAEConfig
from export.train_settings import TrainingError, TrainSettings, check_compatible, data_record
from vae_data.mnist import DataError, Dataset, binarize, load_dataset

SAVE_SECONDS = 30.0  # write last.pt and best.pt at least this often, and after the last epoch
VALIDATION_BINARIZATION_SEED = 1


# ---------------------------------------------------------------------------- the loop


def train(
    settings: TrainSettings,
    config: VAEConfig,
    dataset: Dataset,
    out: Path,
    *,
    data_dir: Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train into `out` and return the final checkpoint state. last.pt is the run so far (for
    a resume), best.pt holds the weights of the epoch with the best validation ELBO (for export
    and evaluation, without optimizer state); pictures are drawn at the end. `stop_after` ends
    after that many epochs in total, as an interruption would (tests use it to check that a
    resume is seamless)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = VAE(config)
    # fused: one kernel for all parameters, 9x faster than the default per-tensor loop on a CPU
    # (a third of the epoch was the optimizer step otherwise).
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, fused=True)
    data = data_record(dataset, data_dir)
    history: dict[str, list[float]] = {}
    start_epoch, best = 0, math.inf

    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume:
        history, start_epoch, best = _resume(last_path, model, optimizer, generator, settings, data)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {config} ({n_params:,} parameters)", flush=True)
    print(f"training: {settings}", flush=True)
    train_probabilities = images_to_tensor(dataset.train.images)
    validation_x = torch.from_numpy(
        binarize(dataset.validation.images, VALIDATION_BINARIZATION_SEED)
    )

    best_weights, best_epoch = model.state_dict(), start_epoch
    if resume and best_path.is_file():
        saved_best = load_checkpoint(best_path)
        best_weights, best_epoch = saved_best["model"], saved_best["epoch"]
    last_saved = time.monotonic()
    end = settings.epochs if stop_after is None else min(stop_after, settings.epochs)
    if start_epoch >= end:
        print(f"nothing to do: {last_path} has {start_epoch} of {settings.epochs} epochs")
    state: dict[str, Any] = {}
    for epoch in range(start_epoch, end):
        t0 = time.perf_counter()
        train_stats = train_epoch(model, optimizer, train_probabilities, settings, epoch, generator)
        train_seconds = time.perf_counter() - t0
        val_stats = validate(model, validation_x)
        row = {
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"val_{k}": v for k, v in val_stats.items()},
            "lr": settings.lr_at(epoch),
            "kl_weight": settings.kl_weight_at(epoch, 1.0),
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0,
        }
        for key, value in row.items():
            history.setdefault(key, []).append(value)
        improved = val_stats["loss"] < best
        if improved:
            best, best_epoch = val_stats["loss"], epoch + 1
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "settings": asdict(settings),
            "data": data,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "best_validation": best,
            "history": history,
            "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state()},
            "torch_version": str(torch.__version__),
        }
        # Saving ~13 MB costs more than a small epoch: save every SAVE_SECONDS and at the end.
        if epoch + 1 == end or time.monotonic() - last_saved >= SAVE_SECONDS:
            save_checkpoint(last_path, state)
            best_state = {k: v for k, v in state.items() if k not in ("optimizer", "rng")}
            save_checkpoint(best_path, {**best_state, "model": best_weights, "epoch": best_epoch})
            last_saved = time.monotonic()
        print(
            f"epoch {epoch + 1:3d}/{settings.epochs}  "
            f"train {train_stats['loss']:7.2f} (rec {train_stats['rec']:6.2f} "
            f"kl {train_stats['kl']:5.2f})  val {val_stats['loss']:7.2f}  "
            f"{train_seconds:5.2f} s/epoch{'  *best' if improved else ''}",
            flush=True,
        )

    if state and state["epoch"] == settings.epochs:
        _finish(best_path, dataset, history, best)
    return state


def _resume(
    last_path: Path,
    model: VAE,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    settings: TrainSettings,
    data: dict[str, Any],
) -> tuple[dict[str, list[float]], int, float]:
    """Put the run of `last_path` back where it stopped (weights, optimizer, both RNGs) and
    return its history, epochs done and best validation loss; TrainingError if it is missing
    or from another run."""
    if not last_path.is_file():
        raise TrainingError(f"cannot resume: {last_path} does not exist")
    saved = load_checkpoint(last_path)
    check_compatible(saved, model.config, settings, data)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    generator.set_state(saved["rng"]["generator"])
    print(f"resuming {last_path} after epoch {saved['epoch']}", flush=True)
    return saved["history"], saved["epoch"], saved["best_validation"]


def _finish(
    best_path: Path, dataset: Dataset, history: dict[str, list[float]], best: float
) -> None:
    """At the last planned epoch: draw the best model's pictures beside its checkpoint and say
    how the run went."""
    from export.pictures import write_pictures  # matplotlib only when pictures are due

    best_state = load_checkpoint(best_path)
    pictures = write_pictures(model_from_checkpoint(best_state), dataset, history, best_path.parent)
    print("pictures: " + ", ".join(str(p) for p in pictures), flush=True)
    summary = training_summary(best_state)
    print(
        f"done: best validation negative ELBO {best:.2f} nats at epoch "
        f"{summary['best_epoch']}, {summary['seconds_per_epoch']:.2f} s/epoch, "
        f"{summary['training_seconds']:.0f} s in all; best checkpoint {best_path}",
        flush=True,
    )


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vae-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, help="MNIST-format IDX files (default: embedded 5k)")
    p.add_argument("--out", type=Path, default=Path("runs/default"), help="checkpoints, pictures")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    # None = the default (or, on --resume, the checkpoint's value)
    for f in fields(TrainSettings):
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=None,
            help=f"default {f.default}",
        )
    default = VAEConfig()
    p.add_argument("--latent-size", type=int, help=f"default {default.latent_size}")
    p.add_argument(
        "--hidden-sizes",
        type=lambda s: tuple(int(w) for w in s.split(",")),
        help=f"comma-separated encoder widths, default {','.join(map(str, default.hidden_sizes))}",
    )
    p.add_argument(
        "--activation", choices=sorted(ACTIVATIONS), help=f"default {default.activation}"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base_settings, base_config = TrainSettings(), VAEConfig()
    if args.resume and (args.out / "last.pt").is_file():
        try:
            saved = load_checkpoint(args.out / "last.pt")  # unspecified flags keep the run's
        except CheckpointError as e:
            raise SystemExit(f"vae-train: {e}") from None
        base_settings = TrainSettings(**saved["settings"])
        base_config = VAEConfig.from_dict(saved["config"])
    settings = replace(
        base_settings,
        **{
            f.name: getattr(args, f.name)
            for f in fields(TrainSettings)
            if getattr(args, f.name) is not None
        },
    )
    config = replace(
        base_config,
        **{
            k: getattr(args, k)
            for k in ("latent_size", "hidden_sizes", "activation")
            if getattr(args, k) is not None
        },
    )
    try:
        dataset = load_dataset(args.data_dir)
        train(settings, config, dataset, args.out, data_dir=args.data_dir, resume=args.resume)
    except (DataError, CheckpointError, TrainingError) as e:
        raise SystemExit(f"vae-train: {e}") from None


if __name__ == "__main__":
    main()
