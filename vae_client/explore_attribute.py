"""`vae-client attribute`: the vector between two groups' mean latents (two folders of PNGs,
two digit classes, or thick versus thin strokes) added at several strengths to images, and how
far the results re-encode along it. Labelled digits come from `vae_data.mnist`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from vae_client import latent, pictures
from vae_client.client import VaeClient
from vae_client.explore_inputs import decode_grid, encode_means, labelled, pngs_in, read_png

DEFAULT_STRENGTHS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)


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
    pictures.save_reported(
        picture, args.out, f"{len(row_names)} images x {len(strengths)} strengths"
    )
    if args.save_vector is not None:
        np.save(args.save_vector, vector)
    print(f"|vector| = {np.linalg.norm(vector):.2f} (latent units)")
    print("strength   ink   re-encoded mean along the vector (1 = one whole vector)")
    ink = images.reshape(*images.shape[:2], -1).mean(axis=2).mean(axis=0)
    for j, s in enumerate(strengths):
        print(f"{s:+8.2f}  {ink[j]:5.1f}  {along[:, j].mean():+.2f}")
