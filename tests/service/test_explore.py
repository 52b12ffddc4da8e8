"""The exploration commands of vae-client against the real server: each writes a picture of the
expected size that shows what the server returned, and prints its summary; `make explore`'s
gallery on the trained default model."""

from __future__ import annotations

import io
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from default_model import MODEL_DIR, default_dataset, default_version
from PIL import Image
from service_harness import Served, running, tiny_settings

from vae_client import cli, gallery, pictures
from vae_client.client import VaeClient
from vae_client.explore_inputs import score_all
from vae_data.mnist import IMAGES_MAGIC, LABELS_MAGIC

TILE = 28 * 2  # the default --scale 2
LINE = pictures.text_size("Ag0.9")[1] + 4  # one line of labels
NOISE = np.random.default_rng(1).integers(0, 256, (28, 28), np.uint8)


def blob(cy: float, cx: float, width: float) -> np.ndarray:
    yy, xx = np.mgrid[:28, :28]
    return np.rint(255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / width)).astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image, mode="L").save(path, format="PNG")
    return path


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny labelled MNIST-format set: blobs whose place depends on the label (0-4) and whose
    width (ink) varies within each label."""
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        labels = np.arange(n) % 5
        images = np.stack(
            [blob(6 + 4 * float(k), 8 + 3 * float(k), rng.uniform(5, 60)) for k in labels]
        )
        write_idx(folder / f"{split}-images-idx3-ubyte", images, IMAGES_MAGIC)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, LABELS_MAGIC)
    return folder


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    return [
        write_png(tmp_path / "a.png", blob(9, 9, 20)),
        write_png(tmp_path / "b.png", blob(19, 18, 40)),
        write_png(tmp_path / "noise.png", NOISE),
    ]


def picture(path: Path) -> np.ndarray:
    """The PNG as an RGB array, after checking it is a non-blank RGB PNG."""
    with Image.open(path) as image:
        assert (image.format, image.mode) == ("PNG", "RGB")
        pixels = np.asarray(image)
    assert pixels.std() > 20 and len(np.unique(pixels)) > 20  # tiles and text, not one colour
    return pixels


def run(served: Served, *argv: object) -> int:
    return cli.main(["--target", served.target, *map(str, argv)])


def assert_tiles_are(pixels: np.ndarray, images: np.ndarray) -> None:
    """The picture's grid of tiles (no captions) is `images` uint8 [rows, columns, 28, 28],
    enlarged, in that order: tile (0, 0) is found in the picture, every other one must sit at
    its place in the grid (pictures.GAP apart) and equal the server's image pixel for pixel."""
    grey = pixels[:, :, 0]
    tiles = np.kron(images, np.ones((2, 2), np.uint8))  # [rows, columns, TILE, TILE]
    first = tiles[0, 0]
    rows = np.lib.stride_tricks.sliding_window_view(grey, TILE, axis=1)  # [H, W - TILE + 1, TILE]
    for y, x in zip(*np.nonzero((rows == first[0]).all(axis=-1)), strict=True):
        if np.array_equal(grey[y : y + TILE, x : x + TILE], first):
            break
    else:
        raise AssertionError("the server's first image is not a tile of the picture")
    step = TILE + pictures.GAP
    for r in range(images.shape[0]):
        for c in range(images.shape[1]):
            at = grey[y + r * step : y + r * step + TILE, x + c * step : x + c * step + TILE]
            assert np.array_equal(at, tiles[r, c]), f"tile ({r}, {c}) is not the server's image"


def test_interpolate_writes_a_strip_of_the_servers_images_and_a_gif(
    served: Served, inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "strip.png"
    assert (
        run(served, "interpolate", inputs[0], inputs[1], "--steps", 6, "--gif", "--out", out) == 0
    )
    pixels = picture(out)
    # One row of 6 tiles under a title line and a line of t values.
    margin, gap = pictures.MARGIN, pictures.GAP
    assert pixels.shape == (2 * margin + 2 * LINE + TILE + LINE, 2 * margin + 6 * TILE + 5 * gap, 3)
    with VaeClient(served.target) as vae:
        images = vae.interpolate(inputs[0].read_bytes(), inputs[1].read_bytes(), steps=6).images
    assert isinstance(images, np.ndarray)
    for c in (0, 5):  # the tiles are the server's images, enlarged
        x, y = margin + c * (TILE + gap), margin + 2 * LINE
        tile = pixels[y : y + TILE, x : x + TILE, 0]
        np.testing.assert_array_equal(tile, np.kron(images[c], np.ones((2, 2), np.uint8)))
    with Image.open(out.with_suffix(".gif")) as gif:
        frames = getattr(gif, "n_frames", 1)
        assert (gif.format, frames, gif.size) == ("GIF", 6 + 4, (28 * 4, 28 * 4))
    printed = capsys.readouterr().out
    assert f"linear interpolation, 6 steps -> {out}" in printed and "latent norm" in printed


def test_interpolate_between_latent_files_on_the_sphere(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "z0.npy", np.array([2.0, 0.0, 0.0, 0.0], np.float32))
    np.save(tmp_path / "z1.npy", np.array([[0.0, 3.0, 0.0, 0.0]], np.float32))
    out = tmp_path / "slerp.png"
    argv = ["interpolate", tmp_path / "z0.npy", tmp_path / "z1.npy", "--slerp", "--out", out]
    assert run(served, *argv) == 0
    picture(out)
    printed = capsys.readouterr().out
    assert "spherical interpolation, 10 steps" in printed
    assert "latent norm 2.00 -> 3.00, from 2.00 to 3.00 on the way" in printed


def test_attribute_grids_from_labels_ink_and_folders(
    served: Served,
    idx_dir: Path,
    inputs: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, vector = tmp_path / "labels.png", tmp_path / "v.npy"
    argv = ["attribute", "--labels", 1, 3, "--data-dir", idx_dir, "--count", 3]
    argv += ["--strengths", 0, 0.5, 1, 2, "--out", out, "--save-vector", vector]
    assert run(served, *argv) == 0
    rows, columns = 3, 4
    height, width, _ = picture(out).shape
    assert 2 * LINE + rows * TILE < height < 2 * LINE + rows * (TILE + 10) + 40
    assert columns * TILE < width < columns * (TILE + 10) + 150  # row labels on the left
    assert np.load(vector).shape == (4,)
    printed = capsys.readouterr().out
    assert "group A: digit 1 (10 images); group B: digit 3 (10 images)" in printed
    assert "3 images x 4 strengths" in printed and "+2.00" in printed

    assert run(served, "attribute", "--ink", "--data-dir", idx_dir, "--out", out) == 0
    assert picture(out).shape[0] > 5 * TILE  # one row per label: 5
    assert "group A: thick strokes" in capsys.readouterr().out

    folder_a, folder_b = tmp_path / "A", tmp_path / "B"
    for folder, images in ((folder_a, inputs[:2]), (folder_b, inputs[2:])):
        folder.mkdir()
        for image in images:
            (folder / image.name).write_bytes(image.read_bytes())
    argv = ["attribute", "--groups", folder_a, folder_b, inputs[0], inputs[1], "--out", out]
    assert run(served, *argv) == 0
    printed = capsys.readouterr().out
    assert "(2 images); group B" in printed and "2 images x 6 strengths" in printed
    # The tiles are the server's decoding of z + s * (mean of A - mean of B), asked the same
    # calls the command makes (the same batches: an encoder run's rounding may depend on them).
    pngs = [p.read_bytes() for p in inputs]
    with VaeClient(served.target) as vae:
        mean_a, mean_b = vae.encode(pngs[:2]).mean, vae.encode(pngs[2:]).mean
        vector = mean_a.astype(np.float64).mean(0) - mean_b.astype(np.float64).mean(0)
        z = vae.encode(pngs[:2]).mean.astype(np.float64)
        strengths = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5])  # the default
        latents = z[:, None, :] + strengths[None, :, None] * vector.astype(np.float32)
        decoded = vae.decode(latents.astype(np.float32).reshape(12, -1)).images
    assert_tiles_are(picture(out), np.asarray(decoded).reshape(2, 6, 28, 28))


def test_traverse_and_manifold_grids(
    served: Served, inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "traverse.png"
    argv = ["traverse", inputs[0], "--dims", "0-2", "--range", -2, 2, "--steps", 5, "--out", out]
    assert run(served, *argv) == 0
    pixels = picture(out)
    height, width, _ = pixels.shape
    assert 3 * TILE < height < 3 * (TILE + 10) + 2 * LINE + 40 and width > 5 * TILE
    with VaeClient(served.target) as vae:  # row d: the image's latent with z[d] set to each value
        z = vae.encode([inputs[0].read_bytes()]).mean[0]
        latents = np.tile(z, (3, 5, 1))
        for d in range(3):
            latents[d, :, d] = [-2, -1, 0, 1, 2]
        images = np.asarray(vae.decode(latents.reshape(15, -1)).images)
    assert_tiles_are(pixels, images.reshape(3, 5, 28, 28))
    printed = capsys.readouterr().out
    assert "3 dimensions (as asked) x 5 values" in printed and "z[2]" in printed

    assert run(served, "traverse", inputs[0], "--out", out) == 0  # default: the most active
    assert "4 dimensions (the most active) x 9 values" in capsys.readouterr().out

    out = tmp_path / "manifold.png"
    assert run(served, "manifold", "-n", 4, "--out", out) == 0
    height, width, _ = picture(out).shape
    assert 4 * TILE < height < 4 * (TILE + 10) + 2 * LINE + 40 and width > 4 * TILE
    assert "4x4 manifold over z[" in capsys.readouterr().out
    assert (
        run(served, "manifold", "-n", 3, "--dims", 1, 3, "--origin", inputs[1], "--out", out) == 0
    )
    assert "3x3 manifold over z[1], z[3]" in capsys.readouterr().out
    # Cell (r, c): the origin image's latent moved to the normal's quantiles (1/6, 3/6, 5/6):
    # z[1] grows to the right, z[3] upwards.
    quantiles = [NormalDist().inv_cdf(q) for q in (1 / 6, 3 / 6, 5 / 6)]
    with VaeClient(served.target) as vae:
        origin = vae.encode([inputs[1].read_bytes()]).mean[0].astype(np.float64)
        latents = np.tile(origin, (3, 3, 1))
        for r in range(3):
            for c in range(3):
                latents[r, c, 1] += quantiles[c]
                latents[r, c, 3] += quantiles[2 - r]
        images = np.asarray(vae.decode(latents.astype(np.float32).reshape(9, -1)).images)
    assert_tiles_are(picture(out), images.reshape(3, 3, 28, 28))


def test_score_table_threshold_and_picture(
    served: Served,
    idx_dir: Path,
    inputs: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "scores.png"
    assert run(served, "score", *inputs, "-k", 4, "--seed", 3, "--out", out) == 0
    alone = picture(out).shape
    printed = capsys.readouterr().out
    assert "(nats; 4 draws, seed 3)" in printed
    assert all(f"{i + 1}  {p.name}" in printed for i, p in enumerate(inputs))

    argv = ["score", *inputs, "-k", 4, "--threshold-percentile", 90, "--data-dir", idx_dir]
    assert run(served, *argv, "--out", out) == 0
    assert picture(out).shape[0] == alone[0] + 180  # the held-out histogram below the tiles
    printed = capsys.readouterr().out
    assert "threshold: the 90th percentile of -log p(x) (IW) over 20 held-out" in printed
    assert "of 3 above the threshold" in printed


def test_exploration_mistakes_are_reported_readably(
    served: Served, inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.png"
    assert run(served, "interpolate", *inputs[:2], "--steps", 1, "--out", out) == 1
    assert "INVALID_ARGUMENT: steps: expected 2 to 4096 points" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="expected dimensions 0 to 3"):
        run(served, "traverse", inputs[0], "--dims", "2-5", "--out", out)
    with pytest.raises(SystemExit, match="cannot read"):
        run(served, "score", tmp_path / "missing.png", "--out", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"no \.png files"):
        run(served, "attribute", "--groups", empty, tmp_path, "--out", out)
    with pytest.raises(SystemExit, match="the same mean latent"):
        run(served, "attribute", "--groups", tmp_path, tmp_path, "--out", out)
    with pytest.raises(SystemExit, match="two different dimensions"):
        run(served, "manifold", "--dims", 1, 1, "--out", out)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(SystemExit, match=r"not a numeric \.npy array"):
        run(served, "traverse", tmp_path / "bad.npy", "--out", out)
    assert not out.exists()


def test_commands_split_their_calls_to_fit_a_small_request_limit(
    tiny_model: Path, idx_dir: Path, inputs: list[Path], tmp_path: Path
) -> None:
    settings = tiny_settings(tiny_model, max_items_per_request=8, metrics_port=-1)
    out = tmp_path / "x.png"
    with running(settings) as small:
        # 50 training digits in groups of 10 or more; 20 held-out digits at 4 draws each; a
        # 5 x 6 attribute grid; 8 samples for the most active dimensions.
        assert run(small, "attribute", "--ink", "--data-dir", idx_dir, "--out", out) == 0
        argv = ["score", *inputs, "-k", 4, "--threshold-percentile", 50, "--data-dir", idx_dir]
        assert run(small, *argv, "--out", out) == 0
        assert run(small, "traverse", inputs[0], "--out", out) == 0
        with VaeClient(small.target) as vae:
            scores = score_all(vae, np.stack([NOISE] * 7), 4, 11)
    assert scores.negative_elbo.shape == (7,) and scores.seed == 11
    assert scores.iw_nll is not None and np.all(scores.iw_nll <= scores.negative_elbo)


def test_make_explore_gallery_on_the_default_model(tmp_path: Path) -> None:
    """What `make explore` runs: a real vae-serve subprocess and every command of the README."""
    version = default_version()
    default_dataset(version)  # skips if the test digits are not here
    out = tmp_path / "explore"
    assert gallery.main(["--model-repo", str(MODEL_DIR.parent), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(name for _, name in gallery.COMMANDS)
    for name in written:
        height, width, _ = picture(out / name).shape
        assert width > 5 * TILE and height > TILE + 2 * LINE
    with Image.open(out / "manifold.png") as manifold:
        assert manifold.width > 15 * TILE and manifold.height > 15 * TILE


def test_tile_grid_lays_out_rows_columns_and_labels() -> None:
    tiles = np.full((2, 3, 28, 28), 255, np.uint8)
    page = pictures.tile_grid(tiles, scale=1, captions=[str(i) for i in range(6)])
    pixels = np.asarray(page)
    margin, gap = pictures.MARGIN, pictures.GAP
    assert page.size == (2 * margin + 3 * 28 + 2 * gap, 2 * margin + 2 * (28 + LINE) + gap)
    assert pixels[margin : margin + 28, margin : margin + 28].min() == 255  # tile (0, 0)
    assert pixels[margin + 28 : margin + 28 + LINE].min() < 100  # its caption is drawn
    buffer = io.BytesIO()
    page.save(buffer, format="PNG")
    assert buffer.tell() > 0
