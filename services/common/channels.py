"""Client channels to other services: keepalives, limits and TLS (each call passes the request id as metadata).

TLS is off unless the service's config names a CA (`--tls-ca`): `configure_tls`
(called by each service that calls others, at start-up) then makes every channel of the process a TLS
channel that trusts that CA, presenting the service's own certificate when
mutual TLS is on (`--tls-client-auth`).
"""

from __future__ import annotations

from typing import Any

import grpc
from infermesh.common.config import ServiceConfig
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


def channel(address: str, options: tuple[tuple[str, Any], ...] = CHANNEL_OPTIONS) -> grpc.aio.Channel:
    """A channel to another service, TLS when configured (no interceptors: a client interceptor costs a
    task per call and per streamed message)."""
    if _credentials is not None:
        return grpc.aio.secure_channel(address, _credentials, options=options)
    return grpc.aio.insecure_channel(address, options=options)
