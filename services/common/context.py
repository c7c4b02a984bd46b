"""Request-scoped context: the request id that every log line carries, and the caller's deadline."""

from __future__ import annotations

import contextvars
import time
import uuid
from typing import Any

from infermesh.common.errors import InvalidRequest

REQUEST_ID_HEADER = "x-request-id"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str:
    return request_id_var.get()


# A request id travels as gRPC metadata and into every log line: visible ASCII only, bounded.
MAX_REQUEST_ID_LENGTH = 128


def valid_request_id(request_id: str | None) -> bool:
    if not request_id:
        return False
    return len(request_id) <= MAX_REQUEST_ID_LENGTH and all("!" <= c <= "~" for c in request_id)


def set_request_id(request_id: str | None) -> contextvars.Token[str]:
    """Binds the request id for the current task (a new one when empty or not a valid id)."""
    return request_id_var.set(request_id if request_id and valid_request_id(request_id) else new_request_id())


def request_metadata(request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    """Outgoing gRPC metadata carrying the request id."""
    rid = request_id or request_id_var.get()
    if not rid or rid == "-":
        return ()
    return ((REQUEST_ID_HEADER, rid),)


def deadline_of(context: Any) -> float | None:
    """A `RequestContext`'s deadline in unix seconds (None: none); InvalidRequest when it is no valid time."""
    if not context.HasField("deadline"):
        return None
    try:
        return float(context.deadline.ToNanoseconds()) / 1e9
    except ValueError as exc:  # nanos out of range and the like
        raise InvalidRequest(f"context.deadline is not a valid time: {exc}", param="context.deadline") from None


def seconds_left(deadline: float, now: float | None = None) -> float:
    """Seconds until an absolute deadline (negative once it has passed), by the wall clock."""
    return deadline - (time.time() if now is None else now)
