"""The Envoy edge configuration, built in one place for every deployment.

`infermesh up` renders it with the local ports; the files under `deploy/`
(`deploy/envoy/envoy.yaml`, `deploy/compose/envoy.yaml`,
`deploy/k8s/base/envoy.yaml`) are rendered from it too, by
`python -m infermesh.supervisor.envoy_config --write`, and a test checks that
they match and that Envoy accepts every one (`envoy --mode validate`).

The edge, on one port for HTTP/1.1 and h2c:
- gRPC (`content-type: application/grpc*`, reflection included) goes to the
  frontends' gRPC port over HTTP/2; everything else (the OpenAI routes,
  `/health`, `/v1/models`, `/metrics`) to their HTTP port.
- Streams are never cut by a route timeout (`timeout: 0s`); idle streams are
  (`stream_idle_timeout`), and a gRPC client's own deadline is honoured.
- Active health checks (gRPC health and HTTP `/health`), outlier detection on
  errors of Envoy's own making (connect failures, resets), retries only when
  nothing reached the upstream (connect failure, reset before the request,
  refused stream), a request-body limit (413), `x-request-id` generated when
  absent and kept when present, JSON access logs on stdout, the admin API on
  127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

T = "type.googleapis.com/envoy.extensions."
MAX_REQUEST_BYTES = 8 * 1024 * 1024
STREAM_IDLE_TIMEOUT = "300s"

# One JSON object per request on stdout. No bodies, no authorization header.
ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "upstream": "%UPSTREAM_HOST%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "user_agent": "%REQ(USER-AGENT)%",
}


@dataclasses.dataclass(frozen=True)
class Frontend:
    """One frontend (or, with DNS, one name for all of them)."""

    host: str
    http_port: int = 8000
    grpc_port: int = 50050


@dataclasses.dataclass(frozen=True)
class EdgeSettings:
    frontends: tuple[Frontend, ...] = (Frontend("127.0.0.1"),)
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    admin_port: int = 9901
    # A DNS cluster for names (compose, Kubernetes), STATIC for IP addresses.
    dns: bool = False
    # A listener on 0.0.0.0 serving only the admin's /ready and
    # /stats/prometheus, for container probes and Prometheus (the admin API
    # itself stays on 127.0.0.1).
    probe_port: int | None = None
    max_request_bytes: int = MAX_REQUEST_BYTES


# Retries in flight per cluster (each is a request that never reached a frontend).
MAX_RETRIES_IN_FLIGHT = 1024


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _cluster(name: str, settings: EdgeSettings, port_of: str, http2: bool) -> dict[str, Any]:
    endpoints = [{"endpoint": {"address": _address(f.host, getattr(f, port_of))}} for f in settings.frontends]
    if http2:
        protocol = {"http2_protocol_options": {
            "connection_keepalive": {"interval": "30s", "timeout": "5s"}}}
        health_check: dict[str, Any] = {"grpc_health_check": {}}
    else:
        protocol = {"http_protocol_options": {}}
        health_check = {"http_health_check": {"path": "/health"}}
    cluster: dict[str, Any] = {
        "name": name,
        "connect_timeout": "2s",
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "3600s"},
            "explicit_http_config": protocol,
        }},
        # Envoy allows 3 retries in flight per cluster by default: a frontend
        # that goes away under load would turn the 4th retry into a 503.
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_retries": MAX_RETRIES_IN_FLIGHT}]},
        "health_checks": [{
            "timeout": "1s",
            "interval": "2s",
            "no_traffic_interval": "5s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            **health_check,
        }],
        # Eject a frontend on errors of the connection itself (refused,
        # reset, timed out), not on a 503 it passes on from the mesh: every
        # frontend would pass on the same one.
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 3,
            "consecutive_5xx": 0,
            "enforcing_consecutive_5xx": 0,
            "consecutive_gateway_failure": 0,
            "enforcing_consecutive_gateway_failure": 0,
            "interval": "5s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
    }
    if settings.dns:
        # Re-resolved every few seconds: replicas come and go.
        cluster = {"name": name, "cluster_type": {"name": "envoy.cluster.dns", "typed_config": {
            "@type": T + "clusters.dns.v3.DnsCluster",
            "dns_refresh_rate": "5s",
            "dns_lookup_family": "V4_ONLY",
            "all_addresses_in_single_endpoint": False,
        }}, **{k: v for k, v in cluster.items() if k != "name"}}
    else:
        cluster = {"name": name, "type": "STATIC", **{k: v for k, v in cluster.items() if k != "name"}}
    return cluster


def _route(match: dict[str, Any], cluster: str) -> dict[str, Any]:
    return {
        "match": {"prefix": "/", **match},
        "route": {
            "cluster": cluster,
            # No route timeout: a stream lasts as long as it produces tokens;
            # stream_idle_timeout ends one that stalls.
            "timeout": "0s",
            "idle_timeout": STREAM_IDLE_TIMEOUT,
            # A gRPC client's deadline (grpc-timeout) still applies.
            "max_stream_duration": {"grpc_timeout_header_max": "0s"},
            # Retry only where the upstream cannot have seen the request.
            "retry_policy": {
                "retry_on": "connect-failure,reset-before-request,refused-stream",
                "num_retries": 3,
                "retry_host_predicate": [{
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {"@type": T + "retry.host.previous_hosts.v3.PreviousHostsPredicate"},
                }],
                # LEAST_REQUEST picks the better of two random hosts, and a dead
                # frontend has no requests in flight: re-pick often enough to get past it.
                "host_selection_retry_max_attempts": 10,
            },
        },
    }


def _edge_listener(settings: EdgeSettings) -> dict[str, Any]:
    manager = {
        "@type": T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "codec_type": "AUTO",  # HTTP/1.1 and h2c (prior knowledge) on one port
        "http_protocol_options": {},
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "common_http_protocol_options": {"idle_timeout": "3600s"},
        "stream_idle_timeout": STREAM_IDLE_TIMEOUT,
        "request_headers_timeout": "10s",
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "generate_request_id": True,
        "preserve_external_request_id": True,
        "always_set_request_id_in_response": True,
        "access_log": [{
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": T + "access_loggers.stream.v3.StdoutAccessLog",
                "log_format": {"json_format": ACCESS_LOG_FORMAT},
            },
        }],
        "route_config": {
            "name": "edge",
            "virtual_hosts": [{
                "name": "infermesh",
                "domains": ["*"],
                "routes": [
                    # `grpc: {}` matches content-type application/grpc and its
                    # +proto/+json variants, reflection included.
                    _route({"grpc": {}}, "frontend_grpc"),
                    _route({}, "frontend_http"),
                ],
            }],
        },
        "http_filters": [
            {
                # Requests (JSON bodies, unary gRPC messages) are small; above
                # the limit the answer is 413. Responses are never buffered.
                "name": "envoy.filters.http.buffer",
                "typed_config": {"@type": T + "filters.http.buffer.v3.Buffer",
                                 "max_request_bytes": settings.max_request_bytes},
            },
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": T + "filters.http.router.v3.Router"}},
        ],
    }
    return {
        "name": "edge",
        "address": _address(settings.listen_host, settings.listen_port),
        "per_connection_buffer_limit_bytes": 1024 * 1024,
        "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}],
    }


def _probe_listener(port: int) -> dict[str, Any]:
    routes = [{"match": {"path": path}, "route": {"cluster": "envoy_admin"}}
              for path in ("/ready", "/stats/prometheus")]
    manager = {
        "@type": T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "probe",
        "route_config": {"name": "probe", "virtual_hosts": [
            {"name": "probe", "domains": ["*"], "routes": routes}]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": T + "filters.http.router.v3.Router"}}],
    }
    return {
        "name": "probe",
        "address": _address("0.0.0.0", port),
        "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}],
    }


def build(settings: EdgeSettings) -> dict[str, Any]:
    """The whole Envoy bootstrap as a dict."""
    listeners = [_edge_listener(settings)]
    clusters = [_cluster("frontend_grpc", settings, "grpc_port", http2=True),
                _cluster("frontend_http", settings, "http_port", http2=False)]
    if settings.probe_port is not None:
        listeners.append(_probe_listener(settings.probe_port))
        clusters.append({
            "name": "envoy_admin",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "envoy_admin", "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address("127.0.0.1", settings.admin_port)}}]}]},
        })
    return {
        "node": {"id": "infermesh-edge", "cluster": "infermesh"},
        "admin": {"address": _address("127.0.0.1", settings.admin_port)},
        # Bounds the connections (and so the memory) clients can pin.
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": T + "resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                             "max_active_downstream_connections": 50000},
        }]},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def render(settings: EdgeSettings, header: str = "") -> str:
    text = yaml.safe_dump(build(settings), sort_keys=False, default_flow_style=False, width=100)
    return header + text


# The files under deploy/ and the settings each is rendered with.
_HEADER = ("# Envoy edge for {what}.\n"
           "# Rendered by `python -m infermesh.supervisor.envoy_config --write` from\n"
           "# services/supervisor/envoy_config.py: edit that, not this file.\n")
VARIANTS: dict[str, tuple[str, EdgeSettings]] = {
    "deploy/envoy/envoy.yaml": (
        "one machine: the frontend on 127.0.0.1:8000 and :50050",
        EdgeSettings()),
    "deploy/compose/envoy.yaml": (
        "docker-compose: every replica of the `frontend` service, found by DNS",
        EdgeSettings(frontends=(Frontend("frontend"),), dns=True, probe_port=9902)),
    "deploy/k8s/base/envoy.yaml": (
        "Kubernetes: every frontend pod, found through the headless Service `frontend-pods`",
        EdgeSettings(frontends=(Frontend("frontend-pods"),), dns=True, probe_port=9902)),
}


def rendered_variants() -> dict[str, str]:
    return {path: render(settings, _HEADER.format(what=what)) for path, (what, settings) in VARIANTS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infermesh.supervisor.envoy_config",
                                     description="Render the Envoy configurations under deploy/.")
    parser.add_argument("--write", action="store_true", help="Write them (default: check they are current).")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="The repository's root.")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered_variants().items():
        target = args.root / path
        if args.write:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        elif not target.is_file() or target.read_text() != text:
            stale.append(path)
    if stale:
        print("out of date (run with --write): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
