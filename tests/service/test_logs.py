"""`--log-format json`: every line the server writes is one JSON object, errors included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_json_logs_are_one_object_a_line_and_a_start_failure_is_one_record(tmp_path: Path) -> None:
    (tmp_path / "mnist-vae" / "1").mkdir(parents=True)  # a version folder without a manifest
    result = subprocess.run(
        [sys.executable, "-m", "service", "--log-format=json", f"--model-repo={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= records[0].keys()
    (error,) = [r for r in records if r["level"] == "ERROR"]
    assert error["message"].startswith("cannot start:") and "manifest" in error["message"]
    assert "\n" not in error["message"] and "exc" not in error
