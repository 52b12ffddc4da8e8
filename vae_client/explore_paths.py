"""The exploration commands that walk the latent space: `interpolate` (a strip between two
endpoints), `traverse` (one latent dimension per row) and `manifold` (a decoded grid over two
dimensions). Each writes one PNG laid out with `vae_client.pictures` and prints what it shows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vae_client import latent, pictures
from vae_client.client import PathName, VaeClient
from vae_client.explore_inputs import active_dims, decode_grid, endpoint_file, latent_of, parse_dims


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
    pictures.save_reported(picture, args.out, f"{path} interpolation, {args.steps} steps")
    print(
        f"latent norm {norms[0]:.2f} -> {norms[-1]:.2f}, "
        f"from {norms.min():.2f} to {norms.max():.2f} on the way"
    )
    if args.gif:
        gif = args.out.with_suffix(".gif")
        frames = pictures.save_gif(result.images, gif, scale=4)
        print(f"animated morph ({frames} frames, there and back) -> {gif}")


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
    pictures.save_reported(
        picture, args.out, f"{len(dims)} dimensions ({how}) x {args.steps} values"
    )
    change = np.abs(np.diff(images.astype(np.float64) / 255, axis=1)).mean(axis=(1, 2, 3))
    print("dim    value in the image   mean pixel change per step")
    for d, c in zip(dims, change, strict=True):
        print(f"z[{d}]{'':<{4 - len(str(d))}} {z[d]:+17.2f}   {c:.4f}")


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
    pictures.save_reported(
        picture, args.out, f"{args.n}x{args.n} manifold over z[{dims[0]}], z[{dims[1]}]"
    )
    print(f"coordinates: the standard normal's quantiles {labels[0]} to {labels[-1]}")
