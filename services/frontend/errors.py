"""The one place that maps the project's errors to HTTP statuses and OpenAI's error body.

OpenAI's body is `{"error": {"message", "type", "param", "code"}}`. A client's
mistake is a 4xx, never a 500; an overloaded mesh is a 429 with `Retry-After`;
nothing able to serve is a 503.
"""

from __future__ import annotations

import json
import math
from http import HTTPStatus
from typing import Any

from infermesh.common.errors import (
    Cancelled,
    DeadlineExceeded,
    InfermeshError,
    InvalidRequest,
    NotFound,
    Overloaded,
    Unauthenticated,
    Unavailable,
)


class PayloadTooLarge(InvalidRequest):
    """The request body is larger than the frontend accepts (HTTP 413)."""


class RouteNotFound(NotFound):
    """No such HTTP route."""


# (HTTP status, OpenAI error type) per error class; the first match wins.
_HTTP: tuple[tuple[type[BaseException], int, str], ...] = (
    (PayloadTooLarge, 413, "invalid_request_error"),
    (InvalidRequest, 400, "invalid_request_error"),
    (Unauthenticated, 401, "authentication_error"),
    (NotFound, 404, "not_found_error"),
    (Overloaded, 429, "rate_limit_error"),
    # Waiting longer than the admission queue allows is overload too: retry later.
    (DeadlineExceeded, 429, "rate_limit_error"),
    (Unavailable, 503, "service_unavailable_error"),
    (Cancelled, 499, "cancelled"),
)


def http_status(exc: BaseException) -> tuple[int, str]:
    for cls, status, kind in _HTTP:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_server_error"


def error_body(exc: BaseException) -> dict[str, Any]:
    """OpenAI's error object for an exception (internal details never leak)."""
    status, kind = http_status(exc)
    if isinstance(exc, InfermeshError) and status != 500:
        message = exc.message
    elif isinstance(exc, InfermeshError):
        message = exc.message or "internal error"
    else:
        message = "internal error"
    param = exc.param if isinstance(exc, InfermeshError) else None
    code = HTTPStatus(status).phrase.lower().replace(" ", "_") if status in HTTPStatus._value2member_map_ \
        else kind
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_json(exc: BaseException) -> bytes:
    return json.dumps(error_body(exc)).encode()


def retry_after_header(exc: BaseException) -> dict[str, str]:
    """`Retry-After` (whole seconds, at least 1) for a 429."""
    if isinstance(exc, (Overloaded, DeadlineExceeded)):
        retry_after = getattr(exc, "retry_after", None)
        seconds = retry_after if retry_after is not None else 1.0
        return {"retry-after": str(max(1, math.ceil(seconds)))}
    return {}


def sse_error_event(exc: BaseException) -> bytes:
    """A stream that failed after it started ends with this event, then `[DONE]`."""
    return b"data: " + error_json(exc) + b"\n\n"
