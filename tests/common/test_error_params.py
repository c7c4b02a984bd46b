"""A client error's `param` travels between services in trailing metadata, and comes back out of an RpcError."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from infermesh.common.errors import (
    PARAM_KEY,
    RETRY_AFTER_KEY,
    ContextLengthExceeded,
    InfermeshError,
    InternalError,
    InvalidRequest,
    NotFound,
    Overloaded,
    QueueTimeout,
    Unavailable,
    from_rpc_error,
    to_status,
)


class FakeRpcError(grpc.RpcError):
    """What a failed call raises, as the frontend sees it."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers


def round_trip(exc: InfermeshError) -> InfermeshError:
    code, details, trailers = to_status(exc)
    return from_rpc_error(FakeRpcError(code, details, trailers))


@pytest.mark.parametrize("exc", [
    InvalidRequest("bad schema", param="response_format"),
    ContextLengthExceeded("too long", param="messages"),
    NotFound("no such model", param="model"),
])
def test_a_client_errors_param_is_in_the_trailers(exc: InfermeshError) -> None:
    code, details, trailers = to_status(exc)
    assert code == exc.grpc_code and details == exc.message
    assert dict(trailers) == {PARAM_KEY: exc.param}
    assert to_status(exc, public=True)[2] == trailers  # a public caller gets it too


def test_no_param_no_trailer() -> None:
    assert to_status(InvalidRequest("bad"))[2] == ()


@pytest.mark.parametrize("exc", [InternalError("boom", param="messages"), Unavailable("down", param="model")])
def test_a_server_errors_param_is_not_sent(exc: InfermeshError) -> None:
    assert PARAM_KEY not in dict(to_status(exc)[2])
    assert to_status(exc, public=True)[1] == exc.public_message


@pytest.mark.parametrize("exc", [
    InvalidRequest("tools[1].function.name: 'f' is given twice", param="tools[1].function.name"),
    NotFound("no such model", param="model"),
])
def test_from_rpc_error_restores_the_param(exc: InfermeshError) -> None:
    back = round_trip(exc)
    assert type(back) is type(exc) and back.param == exc.param and back.message == exc.message


def test_a_context_length_error_comes_back_as_a_400_with_its_param() -> None:
    back = round_trip(ContextLengthExceeded("too long", param="max_tokens"))
    assert isinstance(back, InvalidRequest) and back.http_status == 400 and back.param == "max_tokens"


def test_an_error_without_the_trailer_has_no_param() -> None:
    back = from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad", (("other-key", "x"),)))
    assert isinstance(back, InvalidRequest) and back.param is None


@pytest.mark.parametrize("cls", [Overloaded, QueueTimeout])
def test_overloaded_keeps_retry_after_and_param(cls: type[Overloaded]) -> None:
    exc = cls("queue full", retry_after=2.5, param="priority")
    code, _, trailers = to_status(exc)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(trailers) == {RETRY_AFTER_KEY: "2500", PARAM_KEY: "priority"}
    back = from_rpc_error(FakeRpcError(code, "queue full", trailers))
    assert isinstance(back, Overloaded) and back.retry_after == 2.5 and back.param == "priority"


def test_overloaded_without_a_hint_or_param() -> None:
    back = round_trip(Overloaded("busy"))
    assert isinstance(back, Overloaded) and back.retry_after is None and back.param is None


def test_an_rpc_error_without_status_methods_is_internal() -> None:
    back: Any = from_rpc_error(grpc.RpcError())
    assert isinstance(back, InternalError) and back.param is None


def test_a_param_that_is_not_printable_ascii_stays_out_of_the_metadata() -> None:
    from infermesh.common.errors import PARAM_KEY, InvalidRequest, to_status

    for param in ("tools[0].n\u00e4me", "a\nb"):
        _, _, trailers = to_status(InvalidRequest("bad", param=param))
        assert PARAM_KEY not in dict(trailers)
