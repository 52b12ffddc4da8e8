"""The decoder's uint8 image as a second graph output, so the server does no per-pixel numpy work
for the formats most callers ask for (uint8 and PNG).

`add_image_output` appends Sigmoid -> Mul 255 -> Add 0.5 -> Cast uint8 to a decoder graph: the
rounding of the service's numpy `to_uint8(sigmoid(logits))`, in ONNX Runtime's vectorized kernels
(about as fast as the Gemm's output copy, where numpy took 10-25% of a run). It runs after the
parity check and the precision variants' quality gate, on every decoder file a version carries:
the logits output, and every node computing it, stay as they were checked. The tail is float32
in every variant (an fp16 sigmoid would move many pixels by a level).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from export.manifest import IMAGE_OUTPUT


def add_image_output(path: Path, width: int) -> None:
    """Rewrite the decoder at `path` with a uint8 [N, width] `image` output beside its logits."""
    model = onnx.load(str(path))
    graph = model.graph
    if any(output.name == IMAGE_OUTPUT for output in graph.output):
        raise ValueError(f"{path}: the decoder already has an output named {IMAGE_OUTPUT!r}")
    logits = graph.output[0].name
    graph.initializer.extend(
        [
            helper.make_tensor("image_scale", TensorProto.FLOAT, [], [255.0]),
            helper.make_tensor("image_round", TensorProto.FLOAT, [], [0.5]),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Sigmoid", [logits], ["image_probabilities"], name="image_sigmoid"),
            helper.make_node(
                "Mul", ["image_probabilities", "image_scale"], ["image_scaled"], name="image_mul"
            ),
            # Cast truncates toward zero, as numpy's astype does: p*255 + 0.5 rounds half up.
            helper.make_node(
                "Add", ["image_scaled", "image_round"], ["image_rounded"], name="image_add"
            ),
            helper.make_node(
                "Cast", ["image_rounded"], [IMAGE_OUTPUT], name="image_cast", to=TensorProto.UINT8
            ),
        ]
    )
    graph.output.append(
        helper.make_tensor_value_info(IMAGE_OUTPUT, TensorProto.UINT8, ["N", width])
    )
    onnx.save(model, str(path))
    _check(path)


def _check(path: Path) -> None:
    """ONNX Runtime's own run of the rewritten graph: the images are the logits rounded, but
    for a level here and there. (onnx.checker would refuse the fp16 converter's graphs, whose
    nodes it does not sort; ONNX Runtime sorts them itself.)"""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    latent = session.get_inputs()[0]
    rows = np.random.default_rng(0).standard_normal((64, latent.shape[1]), dtype=np.float32)
    logits, images = session.run(None, {latent.name: rows})
    rounded = np.floor(255 / (1 + np.exp(-logits.astype(np.float64))) + 0.5)
    if images.dtype != np.uint8 or np.abs(images - rounded).max() > 1:
        raise ValueError(f"{path}: the {IMAGE_OUTPUT!r} output does not round the logits")
