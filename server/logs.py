"""Structured logs: one JSON object per line, with the event name and its fields.

Log with ``log.info("serving", extra={"fields": {"port": 50051}})``; the line reads
``{"ts": ..., "level": "INFO", "logger": "server.app", "event": "serving", "port": 50051}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["JsonFormatter", "configure_logging"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        return " ".join(part for part in (super().format(record), fields) if part)


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
