"""Client channels to other services: keepalives, limits, the request id."""

from __future__ import annotations

from typing import Any

import grpc
from infermesh.common.context import REQUEST_ID_HEADER, request_metadata
from infermesh.common.server import CHANNEL_OPTIONS


def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = list(details.metadata or ())
    if not any(k == REQUEST_ID_HEADER for k, _ in metadata):
        metadata.extend(request_metadata())
    return grpc.aio.ClientCallDetails(details.method, details.timeout, grpc.aio.Metadata(*metadata),
                                      details.credentials, details.wait_for_ready)


class _RequestIdUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


class _RequestIdStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


def channel(address: str, *, extra_options: tuple[tuple[str, Any], ...] = ()) -> grpc.aio.Channel:
    """An insecure aio channel that carries the current request id on every call."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS + extra_options,
                                     interceptors=[_RequestIdUnary(), _RequestIdStream()])
