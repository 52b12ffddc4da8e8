"""vae-client: talk to a running vae-serve from the shell.

vae-client info
vae-client sample -n 64 --seed 1 --out samples.png     # a PNG grid; no --out: ASCII preview
vae-client sample -n 1 --seed 7 --out digit.png        # one image: a plain 28x28 PNG
vae-client encode digit.png [more.png ...] [--out latents.npy]
vae-client decode latents.npy --out decoded.png        # or: decode --z -0.1,1,0.5,2
vae-client interpolate a.png b.png --steps 10 [--slerp] [--gif]  # exploration: vae_client.explore
vae-client attribute --ink | --labels 3 8 | --groups DIR_A DIR_B [IMG ...] [--strengths ...]
vae-client traverse digit.png [--dims 0-7] [--range -3 3] [--steps 9]
vae-client manifold [-n 15] [--dims I J]
vae-client score digit.png [...] [--threshold-percentile 99]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import grpc
import numpy as np
from PIL import Image

from vae_client import explore, pictures
from vae_client.client import DEFAULT_TIMEOUT, FORMATS, Images, VaeClient, tls_credentials
from vae_client.explore_inputs import read_png

ASCII_RAMP = " .:-=+*#%@"
GRID_PADDING = 2  # black pixels between and around the tiles of a PNG grid
VALUE_FLAGS = {"--z"}  # flags whose value may start with '-' (see _attach_values)
# TLS to a server started with --tls-cert/--tls-key: the CA to trust, and the client's own
# certificate and key for mutual TLS.
TLS_FLAGS = {
    "ca": "PEM CA that signed the server's certificate: connect with TLS",
    "cert": "PEM client certificate, for a server requiring mutual TLS",
    "key": "PEM private key of --tls-cert",
}


def write_grid(images: np.ndarray, path: Path, columns: int | None = None) -> tuple[int, int]:
    """Save the images as one PNG grid; returns its (width, height) in pixels. One image is
    saved as itself (28x28, no border), so it can be sent back to `encode`."""
    if len(images) == 1:
        tiled = images[0]
    else:
        tiled = pictures.tile(images, columns, gap=GRID_PADDING, border=GRID_PADDING)
    picture = Image.fromarray(tiled, mode="L")
    picture.save(path, format="PNG")
    return picture.size


def ascii_art(image: np.ndarray) -> str:
    levels = (image.astype(np.uint16) * len(ASCII_RAMP) // 256).tolist()
    return "\n".join("".join(ASCII_RAMP[v] * 2 for v in row) for row in levels)


def grey(images: np.ndarray | list[bytes], image_format: str) -> np.ndarray:
    """A tensor format the server returns, as uint8 grey images (binary 0/1 -> 0/255)."""
    array = np.asarray(images)
    if image_format == "probabilities":
        return np.rint(array * 255).astype(np.uint8)
    if image_format == "binary":
        return array * np.uint8(255)
    return array


def show(result: Images, args: argparse.Namespace, what: str) -> None:
    images = grey(result.images, args.format)
    out, columns = args.out, args.columns
    count = f"{len(images)} image{'s' if len(images) != 1 else ''} (seed {result.seed})"
    if out is not None:
        width, height = write_grid(images, out, columns)
        print(f"{what}: {count} -> {out} ({width}x{height} px grid)")
        return
    print(f"{what}: {count}; " + ("the first 3:" if len(images) > 3 else "preview:"))
    for image in images[:3]:
        print(ascii_art(image) + "\n")


def cmd_info(vae: VaeClient, args: argparse.Namespace) -> None:
    info = vae.info()
    print(f"model        {info.name} version {info.version}")
    print(f"latent size  {info.latent_size}")
    print(f"image shape  {'x'.join(map(str, info.image_shape))}")
    print(f"providers    {', '.join(info.providers)}")
    print(f"max items    {info.max_items_per_request} per request")
    for name, value in sorted(info.metrics.items()):
        print(f"metric       {name} = {value:.4g}")


def cmd_sample(vae: VaeClient, args: argparse.Namespace) -> None:
    result = vae.sample(
        args.n, seed=args.seed, temperature=args.temperature, image_format=args.format
    )
    show(result, args, "sampled")


def cmd_encode(vae: VaeClient, args: argparse.Namespace) -> None:
    files = [read_png(Path(p)) for p in args.images]
    result = vae.encode(files, samples_per_image=args.samples, seed=args.seed)
    sigma = np.exp(result.log_variance / 2)
    with np.printoptions(precision=3, suppress=True, linewidth=200):
        for i, name in enumerate(args.images):
            print(f"{name}\n  mean  {result.mean[i]}\n  sigma {sigma[i]}")
            if result.samples is not None:
                print(f"  {args.samples} samples of z (seed {result.seed}):\n{result.samples[i]}")
    if args.out is not None:
        np.save(args.out, result.mean)
        print(f"means [{len(files)}, {result.mean.shape[1]}] -> {args.out}")


def latent_values(text: str) -> list[float]:
    """`--z 0.5,-1.2,3`: one latent as comma-separated numbers."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.5,-1.2,3, got {text!r}"
        ) from None
    return values


def read_latents(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"vae-client: {path}: not a readable .npy array ({e})") from e
    if array.dtype.kind not in "fiu" or array.ndim > 2:
        raise SystemExit(f"vae-client: {path}: expected numbers [N, latent] or [latent]")
    return np.atleast_2d(array)


def cmd_decode(vae: VaeClient, args: argparse.Namespace) -> None:
    rows = [read_latents(p) for p in args.latents]
    rows += [np.array([z]) for z in args.z]
    if not rows:
        raise SystemExit("vae-client: decode: give latents as .npy files or --z v1,v2,...")
    if len({row.shape[1] for row in rows}) > 1:
        raise SystemExit("vae-client: decode: the latents have different sizes")
    latents = np.concatenate(rows).astype(np.float32)
    result = vae.decode(latents, image_format=args.format, seed=args.seed)
    show(result, args, "decoded")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = Parser(prog="vae-client", description="Call a running vae-serve.")
    p.add_argument(
        "--target",
        default=os.environ.get("VAE_TARGET", "localhost:50051"),
        help="server address, e.g. localhost:50051 or dns:///vae:50051 (env VAE_TARGET)",
    )
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="deadline in seconds")
    for name, what in TLS_FLAGS.items():
        env = f"VAE_TLS_{name.upper()}"
        p.add_argument(
            f"--tls-{name}", type=Path, default=os.environ.get(env), help=f"{what} (env {env})"
        )
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="what the server serves").set_defaults(run=cmd_info)

    tensor_formats = [f for f in FORMATS if f != "png"]
    s = sub.add_parser("sample", help="new images from the prior")
    s.add_argument("-n", type=int, default=16, help="how many images")
    s.add_argument("--seed", type=int, help="seed (the server picks one if unset)")
    s.add_argument("--temperature", type=float, help="scales the prior's std (default 1)")
    s.add_argument("--format", choices=tensor_formats, default="uint8")
    s.add_argument("--out", type=Path, help="write a PNG grid here (else an ASCII preview)")
    s.add_argument("--columns", type=int, help="grid columns (default: square)")
    s.set_defaults(run=cmd_sample)

    e = sub.add_parser("encode", help="latent mean and sigma of 28x28 PNG images")
    e.add_argument("images", nargs="+", help="PNG files")
    e.add_argument("--samples", type=int, default=0, help="draws of z per image")
    e.add_argument("--seed", type=int)
    e.add_argument("--out", type=Path, help="save the means as .npy (for decode)")
    e.set_defaults(run=cmd_encode)

    d = sub.add_parser("decode", help="images from latents")
    d.add_argument("latents", nargs="*", help=".npy files of [N, latent] or [latent]")
    d.add_argument(
        "--z",
        action="append",
        type=latent_values,
        default=[],
        help="one latent as v1,v2,... (repeatable; a leading minus is fine: --z -0.5,1.2)",
    )
    d.add_argument("--format", choices=tensor_formats, default="uint8")
    d.add_argument("--seed", type=int, help="seed for --format binary")
    d.add_argument("--out", type=Path, help="write a PNG grid here (else an ASCII preview)")
    d.add_argument("--columns", type=int)
    d.set_defaults(run=cmd_decode)

    explore.add_commands(sub)  # interpolate, attribute, traverse, manifold, score
    return p


def _attach_values(argv: Sequence[str]) -> list[str]:
    """`--z -0.5,1` as `--z=-0.5,1`: argparse takes a value starting with '-' for a flag unless
    it reads as one negative number."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in VALUE_FLAGS and arg.startswith("-") and len(arg) > 1:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done; 1 the server refused or failed the call, or a file could not be
    used; 2 bad arguments; 141 stdout closed early (`| head`), quietly, as a shell reports a
    command killed by SIGPIPE; 130 interrupted."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # Whatever is left in the buffer cannot be written either: point stdout at /dev/null so
        # the interpreter's final flush does not complain (the recipe of Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 130


def _main(argv: Sequence[str]) -> int:
    args = parser().parse_args(_attach_values(argv))
    credentials = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        try:
            credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        except (OSError, ValueError) as e:
            print(f"vae-client: TLS: {e}", file=sys.stderr)
            return 2
    with VaeClient(args.target, timeout=args.timeout, credentials=credentials) as vae:
        try:
            args.run(vae, args)
        except grpc.RpcError as e:
            print(f"vae-client: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    sys.stdout.flush()  # a closed pipe shows here, inside main, not at interpreter exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
