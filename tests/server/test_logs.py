"""server/logs.py: one JSON object per line through python-json-logger, the same fields as ever, plus the
request and trace ids of the request a line is about."""

from __future__ import annotations

import json
import logging
import re
from types import SimpleNamespace

import pytest

from server.logs import JsonFormatter, bind_request, include_trace_ids, unbind_request


@pytest.fixture
def lines():
    """Log records of the logger "server.test", as the JSON objects the formatter writes."""
    written: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append(self.format(record))

    handler = Keep()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("server.test")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, lambda: [json.loads(line) for line in written]
    finally:
        logger.removeHandler(handler)
        include_trace_ids(None)


def test_a_line_has_the_fields_it_always_had(lines):
    logger, read = lines
    logger.info("serving", extra={"fields": {"port": 50051, "path": __import__("pathlib").Path("/m")}})
    logger.warning("plain %s", "text")
    serving, plain = read()
    assert list(serving) == ["ts", "level", "logger", "event", "port", "path"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", serving["ts"])
    assert serving["level"] == "INFO" and serving["logger"] == "server.test" and serving["event"] == "serving"
    assert serving["port"] == 50051 and serving["path"] == "/m"  # what JSON cannot hold, as text
    assert plain["event"] == "plain text" and "fields" not in plain


def test_an_exception_is_written_last(lines):
    logger, read = lines
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("request failed", extra={"fields": {"method": "Classify"}})
    (line,) = read()
    assert list(line)[-1] == "exception" and "ValueError: boom" in line["exception"]
    assert line["method"] == "Classify"


def test_lines_about_a_request_carry_its_id_and_trace(lines):
    logger, read = lines
    call = SimpleNamespace(request_id="")
    token = bind_request(call)
    logger.info("before the id is known")
    call.request_id = "req-1"  # a handler sets it once it has read the request
    include_trace_ids(lambda: {"trace_id": "ab" * 16, "span_id": "cd" * 8})
    logger.info("about it")
    logger.info("its own", extra={"fields": {"request_id": "item-7"}})  # what the caller says wins
    unbind_request(token)
    include_trace_ids(None)
    logger.info("after")
    before, about, own, after = read()
    assert "request_id" not in before
    assert about["request_id"] == "req-1"
    assert (about["trace_id"], about["span_id"]) == ("ab" * 16, "cd" * 8)
    assert own["request_id"] == "item-7"
    assert "request_id" not in after and "trace_id" not in after
