"""`vae-client score`: the negative ELBO and importance-weighted -log p(x) of images (an
anomaly score), optionally against a threshold set by a percentile of held-out test digits;
a table, and a picture of the scored images above the held-out histogram.
"""

from __future__ import annotations

import argparse

import numpy as np

from vae_client import pictures
from vae_client.client import VaeClient, bits_per_pixel
from vae_client.explore_inputs import grey_of, labelled, read_png, score_all


def cmd_score(vae: VaeClient, args: argparse.Namespace) -> None:
    files = [read_png(p) for p in args.images]
    k = args.importance_samples
    scores = score_all(vae, files, k, args.seed)
    estimate = "-log p(x) (IW)" if k else "negative ELBO"
    threshold = None
    if args.threshold_percentile is not None:
        test = labelled(args.data_dir, "test")
        held_out = score_all(vae, test.images, k, args.seed).best
        threshold = float(np.percentile(held_out, args.threshold_percentile))
        print(
            f"threshold: the {args.threshold_percentile:g}th percentile of {estimate} over "
            f"{len(held_out)} held-out test digits = {threshold:.1f} nats "
            f"({bits_per_pixel(threshold):.3f} bits/pixel); their median {np.median(held_out):.1f}"
        )
    flagged = scores.best > threshold if threshold is not None else np.zeros(len(files), bool)
    name_width = max(len(p.name) for p in args.images)
    print(
        f"{'#':>2}  {'image':<{name_width}}  {'-ELBO':>7}  {'recon':>7}  {'KL':>6}  "
        f"{'IW -log p':>9}  {'bits/px':>7}  (nats; {scores.samples} draws, seed {scores.seed})"
    )
    for i, path in enumerate(args.images):
        iw = f"{scores.iw_nll[i]:9.1f}" if scores.iw_nll is not None else f"{'-':>9}"
        print(
            f"{i + 1:>2}  {path.name:<{name_width}}  {scores.negative_elbo[i]:7.1f}  "
            f"{scores.reconstruction[i]:7.1f}  {scores.kl[i]:6.1f}  {iw}  "
            f"{bits_per_pixel(scores.best[i]):7.3f}" + ("  ABOVE THRESHOLD" if flagged[i] else "")
        )
    if threshold is not None:
        print(f"{int(flagged.sum())} of {len(files)} above the threshold")
    columns = min(len(files), args.columns)
    rows = -(-len(files) // columns)
    tiles = np.zeros((rows * columns, 28, 28), np.uint8)
    tiles[: len(files)] = grey_of(files)
    captions = [f"{i + 1}: {s:.0f}" for i, s in enumerate(scores.best)]
    captions += [""] * (len(tiles) - len(files))
    colours = [pictures.MARK if f else pictures.INK for f in flagged] + [pictures.INK] * (
        len(tiles) - len(files)
    )
    parts = [
        pictures.tile_grid(
            tiles.reshape(rows, columns, 28, 28),
            scale=args.scale,
            captions=captions,
            caption_colours=colours,
            title=f"{estimate} in nats (lower: more typical)"
            + ("; red: above the threshold" if threshold is not None else ""),
        )
    ]
    if threshold is not None:
        parts.append(
            pictures.histogram(
                held_out,
                marks=[(float(s), str(i + 1)) for i, s in enumerate(scores.best)],
                threshold=threshold,
                title=f"{estimate} of {len(held_out)} held-out test digits; ticks: the images",
                size=(max(480, parts[0].width), 180),
            )
        )
    pictures.save_reported(pictures.stack(parts), args.out, f"{len(files)} scored images")
