"""Logs carry the request id, as text or JSON (the error table: test_error_table.py)."""

from __future__ import annotations

import json
import logging

import pytest
from infermesh.common.context import request_metadata, set_request_id
from infermesh.common.logs import JsonFormatter, RequestIdFilter, configure_logging


def test_json_log_line_has_request_id_and_extras() -> None:
    set_request_id("rid-json-1")
    record = logging.LogRecord("infermesh.demo", logging.INFO, __file__, 1, "admitted %d", (3,), None)
    record.queue_ms = 12
    RequestIdFilter().filter(record)
    doc = json.loads(JsonFormatter("scheduler").format(record))
    assert doc["request_id"] == "rid-json-1"
    assert doc["msg"] == "admitted 3" and doc["service"] == "scheduler" and doc["queue_ms"] == 12
    assert request_metadata() == (("x-request-id", "rid-json-1"),)


def test_configure_logging_text_includes_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("demo", "info", "text")
    try:
        set_request_id("rid-text-2")
        logging.getLogger("infermesh.demo").info("hello")
        assert "[rid-text-2] hello" in capsys.readouterr().err
    finally:
        logging.getLogger().handlers.clear()
