"""The in-process limit of `make bench`, for real on the tiny model (a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import inprocess


def test_every_kind_is_measured_at_every_batch_size(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inprocess, "WARMUP_S", 0.01)
    result = inprocess.run(tiny_model, [1, 8], duration=0.06, torch=True)
    for kind in ("onnxruntime", "pipeline", "servicer", "torch"):
        points = result[kind]["points"]
        assert [p["batch"] for p in points] == [1, 8]
        assert all(
            p["images_per_s"] > 0 and len(p["images_per_s_rounds"]) == inprocess.ROUNDS
            for p in points
        )
    # PyTorch runs the ONNX file's own weights: the same network.
    assert result["torch"]["max_abs_diff_vs_onnxruntime"] < 1e-4
    assert result["onnxruntime"]["providers"] == ["CPUExecutionProvider"]
