"""What the service requires of a model version's graphs, checked when it loads: the
signatures (`check_signature`, against the manifest and against `wanted_tensors`) and one run
of each network on a batch of 2 (`probe`). Each failure is a ModelError with one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.manifest import IMAGE_OUTPUT, ModelError, NetworkFile
from service.sampling import sigmoid_, to_uint8
from service.settings import IMAGE_SHAPE

# What the service serves: the codec reads and writes IMAGE_SHAPE images (a model for another
# shape is refused at load), and latents within +-LATENT_LIMIT (the prior is N(0, I): beyond a
# few units nothing is typical, and at float32's 3.4e38 the network overflows to NaN). A model
# is refused unless its decoder stays finite at the corners of that box.
SERVED_IMAGE_SHAPE = IMAGE_SHAPE
LATENT_LIMIT = 1e4
FLOAT, UINT8 = "tensor(float)", "tensor(uint8)"
Arg = tuple[str, int]  # an input's or output's ONNX type and width


def check_signature(
    session: ort.InferenceSession, net: NetworkFile, role: str, path: Path, wanted: list[Arg]
) -> None:
    """The graph's own inputs and outputs against the manifest (the same names) and against
    `wanted`, the service's (type, width) of each, input first: [batch, width] each; a
    dimension the graph leaves symbolic is checked by `probe`'s run instead."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    names = [i.name for i in inputs], [o.name for o in outputs]
    expected = [t.name for t in net.inputs], [t.name for t in net.outputs]
    if names != expected:
        raise ModelError(
            f"{path}: the {role} graph has inputs {names[0]} and outputs {names[1]}, the manifest "
            f"says {expected[0]} and {expected[1]}"
        )
    if len(inputs) + len(outputs) != len(wanted):
        raise ModelError(
            f"{path}: the {role} graph has {len(inputs)} input(s) and {len(outputs)} output(s), "
            f"this service reads {len(wanted)} tensors: {wanted}"
        )
    for arg, (dtype, width) in zip([*inputs, *outputs], wanted, strict=True):
        shape = list(arg.shape)
        fits = len(shape) == 2 and (shape[1] == width or not isinstance(shape[1], int))
        if arg.type != dtype or not fits:
            raise ModelError(
                f"{path}: the {role} graph's {arg.name} is {arg.type} {shape}, this service "
                f"needs {dtype} [N, {width}]"
            )


def wanted_tensors(role: str, net: NetworkFile, pixels: int, latent: int) -> list[Arg]:
    """The tensors the service reads of a network: the encoder's image in, mean and log-variance
    out; the decoder's latent in, logits out, and the uint8 image (IMAGE_OUTPUT) where the
    version has it."""
    if role == "encoder":
        return [(FLOAT, pixels), (FLOAT, latent), (FLOAT, latent)]
    image = [(UINT8, pixels)] if net.outputs[1:2] and net.outputs[1].name == IMAGE_OUTPUT else []
    return [(FLOAT, latent), (FLOAT, pixels), *image]


def probe(
    encoder: ort.InferenceSession, decoder: ort.InferenceSession, latent: int, pixels: int
) -> None:
    """A tiny warm-up: run both networks once on a batch of 2 and check what comes back: the
    shapes and dtypes the service reads, and finite values for images in [0, 1] and latents at
    +-LATENT_LIMIT (the largest a request may send). ModelError with a one-line reason
    otherwise."""
    images = np.stack([np.zeros(pixels, np.float32), np.ones(pixels, np.float32)])
    latents = np.stack([np.full(latent, v, np.float32) for v in (LATENT_LIMIT, -LATENT_LIMIT)])
    image = [("uint8", (2, pixels))] if len(decoder.get_outputs()) > 1 else []
    runs = [
        ("encoder", encoder, images, [("float32", (2, latent))] * 2),
        ("decoder", decoder, latents, [("float32", (2, pixels)), *image]),
    ]
    for role, session, feed, wanted in runs:
        try:
            outputs = session.run(None, {session.get_inputs()[0].name: feed})
        except Exception as e:  # ONNX Runtime's own errors
            raise ModelError(
                f"warm-up failed: {role}: a run on a batch of 2: {' '.join(str(e).split())}"
            ) from e
        got = [(o.dtype.name, o.shape) for o in outputs]
        if got != wanted:
            raise ModelError(
                f"warm-up failed: {role}: a run on a batch of 2 returned {got}, this service needs "
                f"{wanted} (latent size {latent}, {pixels} pixels)"
            )
        if not all(np.isfinite(o).all() for o in outputs[:2]):
            inputs = "images of 0 and 1" if role == "encoder" else f"latents of +-{LATENT_LIMIT:g}"
            raise ModelError(f"warm-up failed: {role}: non-finite values for {inputs}")
    if image:  # the graph's images must be the ones numpy would round from its logits
        logits, graph_images = decoder.run(None, {decoder.get_inputs()[0].name: latents / 1e4})
        rounded = to_uint8(sigmoid_(logits)).astype(np.int16)
        if np.abs(rounded - graph_images).max() > 1:
            raise ModelError(
                f"warm-up failed: decoder: its {IMAGE_OUTPUT!r} output is not round(255 * "
                "sigmoid(logits)) as uint8"
            )
