"""Export a trained VAE's encoder and decoder to ONNX as one verified model version.

The graphs are deterministic: the encoder returns (mean, log_variance) and the decoder logits;
sampling with eps happens in the service, seeded, so results are reproducible.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.image_output import add_image_output
from export.manifest import (
    IMAGE_OUTPUT,
    Manifest,
    ModelError,
    NetworkFile,
    TensorSpec,
    Variant,
    list_versions,
    load_verified,
    sha256_of,
)
from export.model import IMAGE_SHAPE, IMAGE_SIZE, VAE
from export.precision import write_variants

OPSET = 17
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 257)


def flat_images(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, 28, 28] or [N, 784] -> float32 [N, 784] in [0, 1]."""
    return (images.reshape(len(images), -1) / 255).astype(np.float32)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _export_network(
    net: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: list[str],
) -> None:
    with warnings.catch_warnings():  # dynamo=False is deliberate; its deprecation is noise
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=output_names,
            dynamic_axes={input_name: {0: "N"}, **{name: {0: "N"} for name in output_names}},
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _max_parity_error(
    net: torch.nn.Module, path: Path, inputs: torch.Tensor, input_name: str
) -> float:
    """Largest |PyTorch - ONNX Runtime (CPU)| over all outputs, at every parity batch size."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for n in PARITY_BATCH_SIZES:
        batch = inputs[:n]
        if batch.shape[0] != n:
            raise ValueError(f"parity needs at least {n} inputs, got {inputs.shape[0]}")
        with torch.no_grad():
            expected = net(batch)
        expected_list = list(expected) if isinstance(expected, tuple) else [expected]
        actual = session.run(None, {input_name: batch.numpy()})
        for e, a in zip(expected_list, actual, strict=True):
            worst = max(worst, float(np.abs(e.numpy() - a).max()))
    return worst


def export_version(
    model: VAE,
    repo: Path,
    name: str,
    *,
    version: int | None = None,
    parity_images: torch.Tensor | None = None,
    parity_images_source: str = "given images",
    training: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    variant_images: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Write `<repo>/<name>/<version>/` (the next free version if None) and return it.

    Parity between PyTorch and ONNX Runtime is checked on `parity_images` (real images, at
    least 257, described by `parity_images_source`; random ones if None) and on random latents,
    at batch sizes 1 and 257; the export fails above 1e-4, and the manifest says how it was
    checked (`parity_check`) and what it found (`parity`). The version directory appears
    atomically (written beside it, then renamed), so a server watching the repository never
    sees half a version.
    """
    model = model.eval()
    latent = model.config.latent_size
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = (list_versions(model_dir) or [0])[-1] + 1
    final = model_dir / str(version)
    if final.exists():
        raise ModelError(f"{final} already exists; choose another --version")

    generator = torch.Generator().manual_seed(0)
    n = max(PARITY_BATCH_SIZES)
    images = (
        parity_images[:n].float()
        if parity_images is not None
        else torch.rand((n, IMAGE_SIZE), generator=generator)
    )
    latents = torch.randn((n, latent), generator=generator)

    # A plain mkdir (not tempfile.mkdtemp, which makes it 0700): the version folder gets the
    # umask's mode, so a server running as another user (the image's uid 10001) can read it.
    staging = model_dir / f".{version}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        _export_network(
            model.encoder, images[:2], staging / "encoder.onnx", "image", ["mean", "log_variance"]
        )
        _export_network(model.decoder, latents[:2], staging / "decoder.onnx", "latent", ["logits"])
        parity = {
            "encoder": _max_parity_error(model.encoder, staging / "encoder.onnx", images, "image"),
            "decoder": _max_parity_error(
                model.decoder, staging / "decoder.onnx", latents, "latent"
            ),
        }
        for role, err in parity.items():
            if not err <= PARITY_TOLERANCE:
                raise ModelError(
                    f"{role}: PyTorch and ONNX Runtime differ by {err:.3g} > {PARITY_TOLERANCE}"
                )

        def spec(tensor_name: str, width: int, dtype: str = "float32") -> TensorSpec:
            return TensorSpec(name=tensor_name, dtype=dtype, shape=["N", width])

        def network(path: str, role: str) -> NetworkFile:
            if role == "encoder":
                inputs = [spec("image", IMAGE_SIZE)]
                outputs = [spec("mean", latent), spec("log_variance", latent)]
            else:
                inputs = [spec("latent", latent)]
                outputs = [spec("logits", IMAGE_SIZE), spec(IMAGE_OUTPUT, IMAGE_SIZE, "uint8")]
            return NetworkFile(
                path=path, sha256=sha256_of(staging / path), inputs=inputs, outputs=outputs
            )

        written, refused = (
            write_variants(staging, *variant_images) if variant_images is not None else ({}, {})
        )
        for decoder in ["decoder.onnx", *(f"decoder.{p}.onnx" for p in written)]:
            add_image_output(staging / decoder, IMAGE_SIZE)  # checked and gated: now the tail
        variants = {
            precision: Variant(
                encoder=network(f"encoder.{precision}.onnx", "encoder"),
                decoder=network(f"decoder.{precision}.onnx", "decoder"),
                **entry,
            )
            for precision, entry in written.items()
        }
        for reason in refused.values():
            print(f"variant not written: {reason}", flush=True)

        manifest = Manifest(
            name=name,
            version=version,
            latent_size=latent,
            image_shape=list(IMAGE_SHAPE),
            opset=OPSET,
            encoder=network("encoder.onnx", "encoder"),
            decoder=network("decoder.onnx", "decoder"),
            config=model.config.to_dict(),
            parity=parity,
            parity_check={
                "tolerance": PARITY_TOLERANCE,
                "batch_sizes": list(PARITY_BATCH_SIZES),
                "provider": "CPUExecutionProvider",
                "encoder_inputs": "random images"
                if parity_images is None
                else parity_images_source,
                "decoder_inputs": "random latents",
                "decoder_image": "the uint8 image output (export/image_output.py) is appended "
                "after this check, to every decoder file",
            },
            training=training or {},
            metrics=metrics or {},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            git_commit=git_commit(),
            variants=variants,
        )
        manifest.write(staging)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    load_verified(final)
    return final


def main(argv: list[str] | None = None) -> None:
    """`vae-export`: a checkpoint -> the next version of a model in a model repository."""
    import argparse
    import json

    from export.checkpoint import (
        CheckpointError,
        dataset_from_checkpoint,
        load_checkpoint,
        model_from_checkpoint,
        training_summary,
    )
    from export.evaluate import evaluate
    from vae_data.mnist import binarized_test_set

    p = argparse.ArgumentParser(prog="vae-export", description=main.__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt from vae-train")
    p.add_argument("--model-repo", type=Path, default=Path("models"))
    p.add_argument("--name", default="mnist-vae")
    p.add_argument("--version", type=int, help="default: one above the latest")
    p.add_argument("--data-dir", type=Path, help="default: the data the checkpoint was trained on")
    p.add_argument("--k", type=int, default=1000, help="importance samples for the test metrics")
    p.add_argument("--metrics", type=Path, help="take the test metrics from vae-evaluate's JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 on free cores)")
    p.add_argument(
        "--no-variants",
        action="store_true",
        help="write only the fp32 networks, not the int8 and fp16 variants",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    try:
        state = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(state)
        dataset = dataset_from_checkpoint(state, args.data_dir)
        if args.metrics:
            metrics = json.loads(args.metrics.read_text())["metrics"]
        else:
            x = torch.from_numpy(binarized_test_set(dataset))
            print(f"evaluating on {len(x)} test images with k={args.k}", flush=True)
            metrics = evaluate(model, x, args.k)
        n = max(PARITY_BATCH_SIZES)
        enough = len(dataset.test) >= n
        parity_images = torch.from_numpy(dataset.test.images[:n]).float() / 255 if enough else None
        path = export_version(
            model,
            args.model_repo,
            args.name,
            version=args.version,
            parity_images=parity_images,
            parity_images_source=f"the first {n} test images ({dataset.description['source']})",
            training={**training_summary(state), "checkpoint": str(args.checkpoint)},
            metrics=metrics,
            variant_images=None
            if args.no_variants
            else (flat_images(dataset.train.images), flat_images(dataset.test.images)),
        )
        manifest = load_verified(path)
        print(
            f"exported {path}: parity {manifest.parity}, test negative ELBO "
            f"{metrics['negative_elbo']:.2f}, -log p(x) ~ {metrics['iw_nll']:.2f} nats "
            f"(k={int(metrics['iw_k'])}), {int(metrics['active_units'])} active units; "
            f"precisions {', '.join(manifest.precisions())}",
            flush=True,
        )
    except (CheckpointError, ModelError) as e:
        raise SystemExit(f"vae-export: {e}") from None


if __name__ == "__main__":
    main()
