"""Client channels to other services: keepalives, limits, the request id, and TLS.

TLS is off unless the service's config names a CA (`--tls-ca`): `configure_tls`
(called by each service that calls others, at start-up) then makes every channel of the process a TLS
channel that trusts that CA, presenting the service's own certificate when
mutual TLS is on (`--tls-client-auth`).
"""

from __future__ import annotations

from typing import Any

import grpc
from infermesh.common.config import ServiceConfig
from infermesh.common.context import REQUEST_ID_HEADER, request_metadata
from infermesh.common.server import CHANNEL_OPTIONS

_credentials: grpc.ChannelCredentials | None = None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def client_credentials(config: ServiceConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials for calls to other services, or None (plaintext) without --tls-ca."""
    if not config.tls_ca:
        return None
    if config.tls_client_auth:
        return grpc.ssl_channel_credentials(_read(config.tls_ca), _read(config.tls_key), _read(config.tls_cert))
    return grpc.ssl_channel_credentials(_read(config.tls_ca))


def configure_tls(config: ServiceConfig) -> None:
    """Every channel this process opens from now on follows `config`'s TLS options."""
    global _credentials
    _credentials = client_credentials(config)


def raw_channel(address: str, options: tuple[tuple[str, Any], ...] = CHANNEL_OPTIONS) -> grpc.aio.Channel:
    """A channel without interceptors (the token path), TLS when configured."""
    if _credentials is not None:
        return grpc.aio.secure_channel(address, _credentials, options=options)
    return grpc.aio.insecure_channel(address, options=options)


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
    """An aio channel (TLS when configured) that carries the current request id on every call."""
    interceptors = [_RequestIdUnary(), _RequestIdStream()]
    if _credentials is not None:
        return grpc.aio.secure_channel(address, _credentials, options=CHANNEL_OPTIONS + extra_options,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS + extra_options, interceptors=interceptors)
