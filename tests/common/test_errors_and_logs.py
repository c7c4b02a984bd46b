"""Errors map to gRPC statuses in one place; logs carry the request id, as text or JSON."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
from infermesh.common import errors
from infermesh.common.context import request_metadata, set_request_id
from infermesh.common.logs import JsonFormatter, RequestIdFilter, configure_logging


@pytest.mark.parametrize("exc, code", [
    (errors.InvalidRequest("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound("gone"), grpc.StatusCode.NOT_FOUND),
    (errors.Unauthenticated("who"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.Overloaded("full", retry_after=1.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable("none"), grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (ValueError("secret detail"), grpc.StatusCode.INTERNAL),
])
def test_status_mapping(exc: Exception, code: grpc.StatusCode) -> None:
    got, details, trailers = errors.to_status(exc)
    assert got == code
    if isinstance(exc, errors.InfermeshError):
        assert details == exc.message
    else:
        assert details == "internal error"  # internals never leak to callers
    if isinstance(exc, errors.Overloaded):
        assert trailers == ((errors.RETRY_AFTER_KEY, "1500"),)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers=()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


def test_from_rpc_error_round_trips_retry_after() -> None:
    err = errors.from_rpc_error(_FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full",
                                              ((errors.RETRY_AFTER_KEY, "2500"),)))
    assert isinstance(err, errors.Overloaded) and err.retry_after == 2.5 and err.message == "queue full"
    assert isinstance(errors.from_rpc_error(_FakeRpcError(grpc.StatusCode.NOT_FOUND, "x")), errors.NotFound)
    assert type(errors.from_rpc_error(_FakeRpcError(grpc.StatusCode.DATA_LOSS, "x"))) is errors.InfermeshError


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
