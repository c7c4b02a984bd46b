"""The project's error types, and the one place they map to gRPC status codes.

Each error says whose fault it is: `client_error` is True when the caller sent
something wrong (never retry as is); `retryable` is True when the same request
may succeed later or elsewhere. The frontend maps the same types to HTTP codes
and OpenAI's error body in one place of its own.
"""

from __future__ import annotations

import grpc

RETRY_AFTER_KEY = "retry-after-ms"


class InfermeshError(Exception):
    """Base of every error the services raise on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    client_error = False
    retryable = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(InfermeshError):
    """The request is malformed or cannot be served as asked (HTTP 400)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    client_error = True


class NotFound(InfermeshError):
    """An unknown model or object (HTTP 404)."""

    code = grpc.StatusCode.NOT_FOUND
    client_error = True


class Unauthenticated(InfermeshError):
    """A missing or wrong API key (HTTP 401)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    client_error = True


class Overloaded(InfermeshError):
    """Refused for lack of capacity; retry after `retry_after` seconds (HTTP 429)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(InfermeshError):
    """Nothing can serve the request now: no worker, a tier down, draining (HTTP 503)."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(InfermeshError):
    """The request waited longer than its deadline or the queue timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class Cancelled(InfermeshError):
    """The caller went away."""

    code = grpc.StatusCode.CANCELLED


class EngineDead(InfermeshError):
    """The engine failed and cannot recover; the process should exit."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


_BY_CODE: dict[grpc.StatusCode, type[InfermeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The gRPC status code, details and trailing metadata for an exception."""
    if isinstance(exc, Overloaded):
        trailers: tuple[tuple[str, str], ...] = ()
        if exc.retry_after is not None:
            trailers = ((RETRY_AFTER_KEY, str(max(0, round(exc.retry_after * 1000)))),)
        return exc.code, exc.message, trailers
    if isinstance(exc, InfermeshError):
        return exc.code, exc.message, ()
    return grpc.StatusCode.INTERNAL, "internal error", ()


def from_rpc_error(err: grpc.RpcError) -> InfermeshError:
    """The project's error for a failed call to another service."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    cls = _BY_CODE.get(code)
    if cls is Overloaded:
        retry_after = None
        trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        for key, value in trailers or ():
            if key == RETRY_AFTER_KEY:
                try:
                    retry_after = int(value) / 1000
                except ValueError:
                    pass
        return Overloaded(details, retry_after=retry_after)
    if cls is None:
        return InfermeshError(details)
    return cls(details)
