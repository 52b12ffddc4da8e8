"""The README's V2 table is bench/results/v2.json's: a new `make bench-v2` that changes a figure
fails here until the README says what the file says."""

from __future__ import annotations

import json
from pathlib import Path

from bench.v2_bench import table_rows

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_quotes_v2_json() -> None:
    result = json.loads((ROOT / "bench" / "results" / "v2.json").read_text())
    readme = (ROOT / "README.md").read_text()
    for row in table_rows(result):
        assert row in readme, row
    assert result["cpu"]["model_name"] in readme
