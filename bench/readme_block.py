"""README blocks written from results files: the text between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` belongs to a generator (bench.report, bench.profile,
bench.reliability_report), and tests/bench/test_readme_figures.py checks it is what the
committed results file gives."""

from __future__ import annotations


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def block(text: str, name: str) -> str:
    """What `text` holds between the markers of `name`."""
    begin, end = markers(name)
    _, found, rest = text.partition(begin)
    inside, closed, _ = rest.partition(end)
    if not found or not closed:
        raise SystemExit(f"no {begin} ... {end} block")
    return inside.removeprefix("\n")


def replace_block(text: str, name: str, new: str) -> str:
    """`text` with the block of `name` replaced by `new`."""
    begin, end = markers(name)
    head, found, rest = text.partition(begin)
    _, closed, tail = rest.partition(end)
    if not found or not closed:
        raise SystemExit(f"no {begin} ... {end} block to replace")
    return f"{head}{begin}\n{new}{end}{tail}"
