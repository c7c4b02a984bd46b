"""The project's errors, and the one table every mapping of them derives from.

Each error class declares, as class attributes, everything the mesh needs to
know about it:

- `grpc_code`: the gRPC status it travels as between services and to gRPC clients;
- `http_status`, `openai_type`, `openai_code`: the HTTP status and OpenAI's
  error body (`{"error": {"message", "type", "param", "code"}}`);
- `retry_elsewhere`: whether the mesh may send the request to another worker
  when a worker answers with it (a refusal before the first token, or a
  failure mid-stream that migrates the request);
- `fall_back`: whether the next model of a fallback chain may take the request
  when its model fails with it before the first token (the catalog's chains);
- `cools_down`: whether the failure counts towards its model's cooldown (a
  model that failed often is skipped for a while): failures of the model, not
  its load or the request;
- `public_message`: for server-side failures (5xx), the only text a client
  sees; the real message is logged with the request id instead.

`ERRORS` lists every class; `to_status` (gRPC), `from_rpc_error` (gRPC back
to a class), `http_status`, `error_body` and `retry_after_header` (HTTP) all
read it, so no mapping can drift from another. A test walks the table.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import grpc

RETRY_AFTER_KEY = "retry-after-ms"
# The parameter a client error names (OpenAI's `param`), carried between services as trailing metadata.
PARAM_KEY = "error-param"


class InfermeshError(Exception):
    """Base of every error the services raise on purpose: a server-side failure unless a subclass says otherwise."""

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "internal_server_error"
    openai_code: ClassVar[str] = "internal_error"
    retry_elsewhere: ClassVar[bool] = True
    fall_back: ClassVar[bool] = True
    cools_down: ClassVar[bool] = True
    public_message: ClassVar[str] = "The server had an error while processing the request."

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def code(self) -> grpc.StatusCode:
        return self.grpc_code


class InternalError(InfermeshError):
    """A failure inside the mesh (a bug, a broken peer); another worker may succeed (HTTP 500)."""


class InvalidRequest(InfermeshError):
    """The request is malformed or cannot be served as asked (HTTP 400)."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    openai_type = "invalid_request_error"
    openai_code = "invalid_request"
    retry_elsewhere = False
    fall_back = False
    cools_down = False


class ContextLengthExceeded(InvalidRequest):
    """The prompt (plus `max_tokens`) does not fit the model's context window (HTTP 400); a fallback chain's
    next model with a larger window may hold it."""

    openai_code = "context_length_exceeded"
    fall_back = True

    def __init__(self, message: str, *, param: str | None = None, prompt_tokens: int = 0) -> None:
        super().__init__(message, param=param)
        self.prompt_tokens = prompt_tokens  # the prompt's tokens, for a route's rules (0: not known)


class PayloadTooLarge(InvalidRequest):
    """The request body is larger than the frontend accepts (HTTP 413)."""

    http_status = 413
    openai_code = "payload_too_large"


class Unauthenticated(InfermeshError):
    """A missing or wrong API key (HTTP 401)."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    openai_type = "authentication_error"
    openai_code = "invalid_api_key"
    retry_elsewhere = False
    fall_back = False
    cools_down = False


class PermissionDenied(InfermeshError):
    """A valid key that may not do this (HTTP 403)."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    openai_type = "permission_error"
    openai_code = "permission_denied"
    retry_elsewhere = False
    fall_back = False
    cools_down = False


class NotFound(InfermeshError):
    """An unknown model or object (HTTP 404)."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    openai_type = "not_found_error"
    openai_code = "model_not_found"
    retry_elsewhere = False
    fall_back = False
    cools_down = False


class RouteNotFound(NotFound):
    """No such HTTP route (HTTP 404)."""

    openai_code = "not_found"


class MethodNotAllowed(InfermeshError):
    """The route exists, not with this method (HTTP 405)."""

    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    http_status = 405
    openai_type = "invalid_request_error"
    openai_code = "method_not_allowed"
    retry_elsewhere = False
    fall_back = False
    cools_down = False


class Overloaded(InfermeshError):
    """Refused for lack of capacity; retry after `retry_after` seconds (HTTP 429 with Retry-After).

    A worker at capacity refuses with it too, so the mesh tries another worker.
    """

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    openai_type = "rate_limit_error"
    openai_code = "overloaded"
    retry_elsewhere = True
    cools_down = False  # load, not a failure of the model

    def __init__(self, message: str, *, retry_after: float | None = None, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class QueueTimeout(Overloaded):
    """No worker had room within the admission queue's timeout: overload, retry later (HTTP 429)."""

    openai_code = "queue_timeout"


class DeadlineExceeded(InfermeshError):
    """The caller's own deadline passed before the request finished (HTTP 504)."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    openai_type = "timeout_error"
    openai_code = "deadline_exceeded"
    retry_elsewhere = False
    fall_back = False
    cools_down = False
    public_message = "The request's deadline passed before it finished."


class Unavailable(InfermeshError):
    """Nothing can serve the request now: no worker, a tier down, draining (HTTP 503)."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    openai_type = "service_unavailable_error"
    openai_code = "service_unavailable"
    retry_elsewhere = True
    public_message = "The model cannot be served right now; retry later."


class EngineDead(Unavailable):
    """The engine failed and cannot recover; the worker exits (HTTP 503: other workers may serve)."""


class VersionRolledBack(Unavailable):
    """The scheduler rolled back the canary version a request was split to (the frontend's view of the split
    was behind): the request goes to the model's stable version, never to another worker of this one."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    retry_elsewhere = False
    cools_down = False  # the version is out already; its model is not failing


class Cancelled(InfermeshError):
    """The other side of a call went away (HTTP 499, which no client reads).

    From a worker it means the worker cancelled (it is stopping): another may serve. The
    frontend's own cancellation (its client left) is told apart before this is consulted.
    """

    grpc_code = grpc.StatusCode.CANCELLED
    http_status = 499
    openai_type = "cancelled"
    openai_code = "cancelled"
    retry_elsewhere = True
    cools_down = False
    public_message = "The request was cancelled."


# Every error class: the table the mappings and their test walk.
ERRORS: tuple[type[InfermeshError], ...] = (
    InternalError, InvalidRequest, ContextLengthExceeded, PayloadTooLarge, Unauthenticated, PermissionDenied,
    NotFound, RouteNotFound, MethodNotAllowed, Overloaded, QueueTimeout, DeadlineExceeded, Unavailable, EngineDead,
    VersionRolledBack, Cancelled,
)

# A gRPC status from another service, back to a class: the class whose code it is (the most
# general one where several share it), and the codes no class sends.
_BY_CODE: dict[grpc.StatusCode, type[InfermeshError]] = {}
for _cls in ERRORS:
    _BY_CODE.setdefault(_cls.grpc_code, _cls)
_BY_CODE.update({
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
    grpc.StatusCode.ABORTED: Unavailable,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
})


def as_error(exc: BaseException) -> InfermeshError:
    """The project's error for any exception (an unexpected one is an InternalError)."""
    if isinstance(exc, InfermeshError):
        return exc
    return InternalError(f"{type(exc).__name__}: {exc}")


def to_status(exc: BaseException, *, public: bool = False) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The gRPC status code, details and trailing metadata for an exception.

    `public`: the caller is outside the mesh (the public API), so a server-side failure says only
    its class's public message. Between services the message travels (it is logged, never shown).
    """
    if not isinstance(exc, InfermeshError):
        return grpc.StatusCode.INTERNAL, InternalError.public_message, ()
    details = exc.message
    if public and exc.http_status >= 500:
        details = exc.public_message
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, Overloaded) and exc.retry_after is not None:
        trailers = ((RETRY_AFTER_KEY, str(max(0, round(exc.retry_after * 1000)))),)
    if exc.param and exc.http_status < 500 and exc.param.isascii() and exc.param.isprintable():
        trailers += ((PARAM_KEY, exc.param),)  # metadata values are printable ASCII
    return exc.grpc_code, details, trailers


def from_rpc_error(err: grpc.RpcError) -> InfermeshError:
    """The project's error for a failed call to another service."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    cls = _BY_CODE.get(code, InternalError)
    param = _trailer(err, PARAM_KEY)
    if issubclass(cls, Overloaded):
        return cls(details, retry_after=retry_after_of(err), param=param)
    return cls(details, param=param)


def _trailer(err: grpc.RpcError, name: str) -> str | None:
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == name:
            return str(value)
    return None


def retry_after_of(err: grpc.RpcError) -> float | None:
    """The `retry-after-ms` hint a refusal carries, in seconds."""
    value = _trailer(err, RETRY_AFTER_KEY)
    if value is None:
        return None
    try:
        return int(value) / 1000
    except ValueError:
        return None


# ---- HTTP ---------------------------------------------------------------------------------------

def http_status(exc: BaseException) -> int:
    return as_error(exc).http_status


def error_body(exc: BaseException, request_id: str = "") -> dict[str, Any]:
    """OpenAI's error object; a server-side failure shows its public message (and the request id) only."""
    err = as_error(exc)
    if err.http_status >= 500:
        message = err.public_message + (f" (request id {request_id})" if request_id else "")
        param = None
    else:
        message, param = err.message, err.param
    return {"error": {"message": message, "type": err.openai_type, "param": param, "code": err.openai_code}}


def retry_after_header(exc: BaseException) -> dict[str, str]:
    """`Retry-After` (whole seconds, at least 1) for a refusal for lack of capacity."""
    if isinstance(exc, Overloaded):
        seconds = exc.retry_after if exc.retry_after is not None else 1.0
        return {"retry-after": str(max(1, math.ceil(seconds)))}
    return {}
