"""Logging for the server: readable text on a terminal, one JSON object a line in a container.

A log collector (Fluent Bit, Vector, Cloud Logging) reads a JSON line as one record, so a
traceback stays inside its record (`exc`, one string) instead of becoming many loose lines.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message"[, "worker"][, "exc"]}` on one line."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, log_format: LogFormat, worker: int | None = None) -> None:
    """The root logger: `level`, to stderr, as text or JSON lines; `worker`: the index of a
    worker of `--workers N`, named on each line."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = "" if worker is None else f"[worker {worker}] "
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s", tag + "%(name)s")))
    logging.basicConfig(level=level, handlers=[handler], force=True)
