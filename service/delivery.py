"""Which replies never reached their caller: read from gRPC's own log.

gRPC core logs a reply it could not send because the caller had gone (the last batch of the
call failed) as an ERROR with a traceback, from inside the call's own task, and tells it in no
other way. `DELIVERY`, a filter on that logger, notes the task (the interceptor then counts the
call CANCELLED, not OK) and leaves one INFO line instead of the traceback.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

GRPC_LOGGER = "grpc._cython.cygrpc"
UNDELIVERED_LOG = "ExecuteBatchError raised in core by servicer method"


class _DeliveryFilter(logging.Filter):
    """Notes the task of each call whose reply gRPC could not send, and turns the ERROR with a
    traceback into one INFO line."""

    def __init__(self) -> None:
        super().__init__()
        self.undelivered: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(UNDELIVERED_LOG):
            return True
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
        if task is not None:
            self.undelivered.add(task)
        method = record.getMessage().rpartition("[")[2].rstrip("]")
        record.msg, record.args = "%s: the caller went away before its reply was sent", (method,)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


DELIVERY = _DeliveryFilter()
logging.getLogger(GRPC_LOGGER).addFilter(DELIVERY)
