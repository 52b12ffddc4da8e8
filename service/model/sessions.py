"""ONNX Runtime sessions on the execution provider the settings ask for (`cpu`, `cuda`, `auto`),
with the session options the service measured best. No model knowledge here: `runtime.py`
verifies what the sessions hold."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from export.manifest import ModelError
from service.settings import Settings

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
QUIET = 4  # ONNX Runtime's FATAL: nothing below it is logged
WARNING = 2  # ONNX Runtime's default severity


class ProviderError(RuntimeError):
    """The execution provider asked for cannot run here (e.g. `cuda` without a usable GPU)."""


def session_options(settings: Settings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning intra-op threads take cores from the event loop (measured: slower at every size).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _open_session(
    path: Path, graph: bytes, settings: Settings, providers: list[str], *, quiet: bool = False
) -> ort.InferenceSession:
    """A session from the verified bytes (`path` only names it in errors)."""
    options = session_options(settings)
    if quiet:
        options.log_severity_level = QUIET
    try:
        return ort.InferenceSession(graph, options, providers=providers)
    except Exception as e:  # ONNX Runtime raises its own untyped errors on a bad graph
        reason = " ".join(str(e).split())  # one line in the log
        raise ModelError(f"{path}: ONNX Runtime cannot load it: {reason}") from e


def open_with_provider(path: Path, graph: bytes, settings: Settings) -> ort.InferenceSession:
    """Open one session on the provider the settings ask for.

    onnxruntime-gpu lists CUDA as available even without a GPU, and a session asked for CUDA
    silently runs on the CPU: only `get_providers()` after creation tells the truth.
    """
    if settings.provider == "cpu":
        return _open_session(path, graph, settings, [CPU])
    if settings.provider == "cuda":
        session = _open_session(path, graph, settings, [CUDA, CPU])
        if CUDA not in session.get_providers():
            raise ProviderError(
                "provider 'cuda' was requested but ONNX Runtime cannot use CUDA here (no GPU, "
                f"or missing CUDA/cuDNN libraries; see its message above): providers in use are "
                f"{session.get_providers()}. Use --provider auto or cpu to run on the CPU."
            )
        return session
    if CUDA not in ort.get_available_providers():
        return _open_session(path, graph, settings, [CPU])
    # auto: try CUDA quietly (its failure is expected on CPU hosts), then tell what happened.
    # The session's own severity quiets what the session logs, but not the failure to load the
    # CUDA provider library, which ONNX Runtime logs on its process-wide default logger
    # (checked with onnxruntime 1.31): so that logger is quieted for this one attempt too, and
    # set back to ONNX Runtime's default (it has no getter; the service sets it nowhere else).
    ort.set_default_logger_severity(QUIET)
    try:
        return _open_session(path, graph, settings, [CUDA, CPU], quiet=True)
    finally:
        ort.set_default_logger_severity(WARNING)
