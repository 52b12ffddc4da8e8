"""The in-process batching on/off comparison, for real on the tiny model (a second or so)."""

from __future__ import annotations

from pathlib import Path

from bench import batching_ab


def test_both_modes_are_measured_in_every_round(tiny_model: Path) -> None:
    result = batching_ab.run(tiny_model, count=3, rounds=3, seconds=0.05)
    for mode in ("on", "off"):
        assert result[mode]["calls_per_s"] > 0 and result[mode]["cpu_us_per_call"] > 0
    ratio = result["on_over_off"]
    assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
