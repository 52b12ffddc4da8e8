"""`make explore`: the README's pictures of the latent space, made by the real commands.

Serves a model with `vae-serve` in a subprocess on a free port, writes a few inputs (held-out
test digits, letters drawn with Pillow, an inverted digit, noise) to a scratch folder, runs the
`vae-client` exploration commands against the server, each writing its PNG into `--out`, and
stops the server. Every command is printed before its own summary, so the log is the recipe.

    python -m vae_client.gallery --model-repo models --model-name mnist-vae --out docs/explore
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vae_client import cli
from vae_data.mnist import load_dataset

START_TIMEOUT = 120.0  # seconds for the server to load, warm up and say SERVING
SERVING = re.compile(r"SERVING .* on port (\d+)")


@contextlib.contextmanager
def served(model_repo: Path, model_name: str, log: Path) -> Iterator[str]:
    """Run vae-serve on a free loopback port until the block ends; yields its target."""
    command = [sys.executable, "-m", "service", "--model-repo", str(model_repo)]
    command += ["--model-name", model_name, "--host", "127.0.0.1", "--port", "0"]
    command += ["--metrics-port", "-1"]
    with log.open("w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while (found := SERVING.search(log.read_text())) is None:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gallery: vae-serve did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield f"127.0.0.1:{found.group(1)}"
    finally:
        server.terminate()  # SIGTERM: a graceful stop
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def letter(character: str, size: int = 26) -> np.ndarray:
    """A capital letter, white on black and centred like an MNIST digit: uint8 [28, 28]."""
    image = Image.new("L", (28, 28), 0)
    font = ImageFont.load_default(size=size)
    ImageDraw.Draw(image).text((14, 14), character, fill=255, font=font, anchor="mm")
    return np.asarray(image)


def write_inputs(folder: Path) -> None:
    """digit-<label>.png: the first held-out test digit of each class; letter-<X>.png;
    inverted-7.png; noise.png."""
    test = load_dataset(verbose=False).test
    for label in range(10):
        first = test.images[np.flatnonzero(test.labels == label)[0]].reshape(28, 28)
        Image.fromarray(first).save(folder / f"digit-{label}.png")
        if label == 7:
            Image.fromarray(255 - first).save(folder / "inverted-7.png")
    for character in "AKR":
        Image.fromarray(letter(character)).save(folder / f"letter-{character}.png")
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")


# The exploration commands as a person types them (inputs in the current folder), and the
# picture each writes (`--out` is added).
COMMANDS = [
    ("interpolate digit-3.png digit-6.png --steps 10", "interpolation-linear.png"),
    ("interpolate digit-3.png digit-6.png --steps 10 --slerp", "interpolation-slerp.png"),
    ("attribute --ink --strengths -1 -0.5 0 0.5 1 1.5", "attribute-ink.png"),
    (
        "attribute --labels 3 8 --count 5 --strengths 0 0.25 0.5 0.75 1 1.25",
        "attribute-8-to-3.png",
    ),
    ("traverse digit-5.png --range -3 3 --steps 9", "traversal.png"),
    ("manifold -n 15", "manifold.png"),
    (
        "score digit-0.png digit-3.png digit-4.png digit-9.png letter-A.png letter-K.png "
        "letter-R.png inverted-7.png noise.png --seed 0 --threshold-percentile 99",
        "scores.png",
    ),
]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gallery", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repo", type=Path, default=Path("models"))
    p.add_argument("--model-name", default="mnist-vae")
    p.add_argument("--out", type=Path, default=Path("docs/explore"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="vae-gallery-") as scratch:
        inputs = Path(scratch)
        write_inputs(inputs)
        with served(args.model_repo, args.model_name, inputs / "serve.log") as target:
            print(f"vae-serve on {target}; inputs in {inputs}\n")
            with contextlib.chdir(inputs):
                for command, picture in COMMANDS:
                    print(f"$ vae-client {command} --out {args.out / picture}")
                    argv = ["--target", target, *shlex.split(command), "--out", str(out / picture)]
                    code = cli.main(argv)
                    print()
                    if code != 0:
                        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
