"""Structured logs: one JSON object per line (python-json-logger), with the event name and its fields.

Log with ``log.info("serving", extra={"fields": {"port": 50051}})``; the line reads
``{"ts": ..., "level": "INFO", "logger": "server.app", "event": "serving", "port": 50051}``.

A line written while a request is handled (``bind_request``, server/calls.py) also carries its
``request_id`` and, while tracing is on (``include_trace_ids``), the ``trace_id`` and ``span_id`` of the
span it belongs to. docs/OPERATIONS.md lists the fields.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _JsonLoggerFormatter

__all__ = ["JsonFormatter", "bind_request", "configure_logging", "include_trace_ids", "unbind_request"]

# The request being handled in this task (anything with a ``request_id``, read when a line is written:
# a handler sets the id once it has read it).
_request: contextvars.ContextVar[Any] = contextvars.ContextVar("cbam_request", default=None)
_trace_ids: Callable[[], dict[str, str] | None] | None = None


def bind_request(call: Any) -> contextvars.Token:
    """Lines written from now on in this task are about ``call``; give the token to unbind_request."""
    return _request.set(call)


def unbind_request(token: contextvars.Token) -> None:
    _request.reset(token)


def include_trace_ids(ids: Callable[[], dict[str, str] | None] | None) -> None:
    """Add ``ids()`` (trace_id and span_id of the current span) to every line; None stops it."""
    global _trace_ids
    _trace_ids = ids


def _request_fields() -> dict[str, str]:
    fields = {}
    call = _request.get()
    if call is not None and call.request_id:
        fields["request_id"] = call.request_id
    if _trace_ids is not None and (ids := _trace_ids()) is not None:
        fields.update(ids)
    return fields


class JsonFormatter(_JsonLoggerFormatter):
    """ts (UTC, milliseconds), level, logger, event, then the record's ``fields``, and ``exception``."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={
                "asctime": "ts", "levelname": "level", "name": "logger", "message": "event",
                "exc_info": "exception",
            },
            json_default=str,
            json_ensure_ascii=False,
        )  # fmt: skip

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict) -> None:
        super().add_fields(log_data, record, message_dict)
        fields = log_data.pop("fields", None)
        exception = log_data.pop("exception", None)
        log_data.update(_request_fields())
        if fields:
            log_data.update(fields)  # what the caller said wins
        if exception is not None:
            log_data["exception"] = exception  # last, as it is the longest


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {**_request_fields(), **getattr(record, "fields", {})}
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        return " ".join(part for part in (super().format(record), text) if part)


class _WithFields(logging.Filter):
    """Adds the same fields to every record (a worker's index), before the record's own."""

    def __init__(self, fields: dict[str, object]) -> None:
        super().__init__()
        self._fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**self._fields, **getattr(record, "fields", {})}
        return True


def configure_logging(level: str, json_lines: bool = True, fields: dict[str, object] | None = None) -> None:
    """Send every log record at ``level`` or above to stderr, as JSON lines or plain text, each with
    ``fields`` added."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else _TextFormatter("%(asctime)s %(levelname)s %(message)s")
    )
    if fields:
        handler.addFilter(_WithFields(fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
