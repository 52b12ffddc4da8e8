"""The VAE decoder as the peers run it: one ONNX Runtime session; uint8 pixels from the graph's
own `image` output where the version has one (as the service takes them), else in numpy.

Shared by the PyTriton and MLServer peers (it imports nothing but numpy and onnxruntime), so
both run exactly the same computation. The session is set up like the service's: CPU provider,
one intra-op thread, spinning off (spinning threads take the core from the server's own
threads on a 2-core machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

IMAGE_SIZE = 784


def network_file(precision: str) -> str:
    """The decoder file of a precision: `decoder.onnx` (fp32) or a variant, `decoder.int8.onnx`."""
    return "decoder.onnx" if precision == "fp32" else f"decoder.{precision}.onnx"


class Decoder:
    """latents [N, L] float32 -> probabilities [N, 784] float32, or pixels [N, 784] uint8."""

    def __init__(self, version_dir: Path, threads: int = 1, precision: str = "fp32") -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(version_dir / network_file(precision)), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.logits_output, self.image_output = outputs[0], "image" if "image" in outputs else None
        self.latent_size = int(
            json.loads((version_dir / "manifest.json").read_text())["latent_size"]
        )

    def probabilities(self, latents: np.ndarray) -> np.ndarray:
        logits: np.ndarray = self.session.run([self.logits_output], {self.input_name: latents})[0]
        # sigmoid in place: 1 / (1 + exp(-x))
        np.negative(logits, out=logits)
        np.exp(logits, out=logits)
        logits += 1.0
        np.reciprocal(logits, out=logits)
        return logits

    def pixels(self, latents: np.ndarray) -> np.ndarray:
        if self.image_output is not None:
            feed = {self.input_name: latents}
            images: np.ndarray = self.session.run([self.image_output], feed)[0]
            return images
        probabilities = self.probabilities(latents)
        probabilities *= 255.0
        probabilities += 0.5
        return probabilities.astype(np.uint8)
