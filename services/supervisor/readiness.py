"""Readiness checks: gRPC health, an HTTP 200, and combinations of them.

Each check is one quick, bounded probe that answers True or False; the
supervisor polls them.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Check = Callable[[], bool]
# Local probes never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def grpc_status(address: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The gRPC health status at `address`, or None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # the server does not know `service`
                return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return None
    return int(reply.status)


def grpc_serving(address: str) -> Check:
    return lambda: grpc_status(address) == health_pb2.HealthCheckResponse.SERVING


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def http_ok(url: str) -> Check:
    return lambda: http_status(url) == 200


def all_of(*checks: Check) -> Check:
    return lambda: all(check() for check in checks)


def url_host(host: str) -> str:
    """The address to reach a service bound to `host` (0.0.0.0 -> 127.0.0.1)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
