"""Console-script entry points of `export/`: a clear line, not a traceback, without torch.

Training, evaluation and export need the `train` extra (torch, onnx, mlxtend). The serving image
and a plain `pip install vae-serve` leave it out, yet install every console script of the
package; these wrappers turn the missing extra into one line and exit status 1 (each command's
own `main` does the same for its errors: the library code below raises, never exits).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# The top-level modules of pyproject's `train` extra.
TRAINING_MODULES = {"torch", "onnx", "mlxtend", "tqdm", "matplotlib"}


def _main_of(module: str, command: str) -> Callable[[], None]:
    def run() -> None:
        try:
            main = importlib.import_module(module).main
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] not in TRAINING_MODULES:
                raise
            sys.exit(
                f"{command}: needs the training extra ({error.name} is not installed): "
                "pip install 'vae-serve[train]'"
            )
        main()

    return run


train = _main_of("export.train", "vae-train")
evaluate = _main_of("export.evaluate", "vae-evaluate")
export = _main_of("export.onnx_export", "vae-export")
