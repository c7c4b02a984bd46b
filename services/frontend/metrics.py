"""The frontend's Prometheus metrics (served on its HTTP port at /metrics).

Every labelled family exists at zero before its first request (`precreate`),
so that an alert or a KEDA query reads 0 rather than "no data".
"""

from __future__ import annotations

from collections.abc import Iterable

from infermesh.common.catalog import Catalog
from infermesh.common.metrics import LATENCY_BUCKETS
from infermesh.v1 import inference_pb2
from prometheus_client import Counter, Gauge, Histogram

GRPC_METHODS = tuple(m.name for m in inference_pb2.DESCRIPTOR.services_by_name["Inference"].methods)
# The gRPC codes a worker failure that the frontend retries can carry.
RETRY_REASONS = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL", "UNKNOWN", "CANCELLED", "ABORTED")
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

HTTP_REQUESTS = Counter("infermesh_http_requests_total", "HTTP requests by route and status code.",
                        ["route", "code"])
GRPC_REQUESTS = Counter("infermesh_frontend_grpc_requests_total", "Public gRPC calls by method and code.",
                        ["method", "code"])
TTFT = Histogram("infermesh_time_to_first_token_seconds", "Time from request to the first generated token.",
                 buckets=LATENCY_BUCKETS)
ITL = Histogram("infermesh_inter_token_latency_seconds", "Time between generated tokens.", buckets=_TOKEN_BUCKETS)
E2E = Histogram("infermesh_e2e_request_latency_seconds", "Time from request to its last token.",
                buckets=LATENCY_BUCKETS)
TOKENS_IN = Counter("infermesh_prompt_tokens_total", "Prompt tokens of admitted requests.")
TOKENS_OUT = Counter("infermesh_generation_tokens_total", "Generated tokens streamed to clients.")
ACTIVE_STREAMS = Gauge("infermesh_active_streams", "Requests generating right now.", ["api"])
RETRIES = Counter("infermesh_frontend_worker_retries_total",
                  "Worker calls retried or migrated to another worker, by failure.", ["reason"])
# The catalog's routes, fallbacks and cooldowns (precreated per catalog by `precreate_catalog`).
ROUTE_DECISIONS = Counter("infermesh_frontend_route_decisions_total",
                          "Requests for a route, by the model its rules picked.", ["route", "target"])
SERVED = Counter("infermesh_frontend_model_requests_total",
                 "Generation requests by the model asked for (a name, alias or route) and the model that served.",
                 ["requested", "served"])
FALLBACKS = Counter("infermesh_frontend_fallbacks_total",
                    "Requests a model could not take before their first token, sent to the next model of its chain.",
                    ["from_model", "to_model", "reason"])
COOLDOWNS = Counter("infermesh_frontend_model_cooldowns_total", "Times a model entered cooldown.", ["model"])
COOLING = Gauge("infermesh_frontend_model_cooling", "1 while a model is in cooldown (skipped, or probed).", ["model"])
COOLDOWN_PROBES = Counter("infermesh_frontend_model_cooldown_probes_total",
                          "Requests let through to a model in cooldown to probe it.", ["model"])
FALLBACK_REASONS = ("overloaded", "unavailable", "failed", "context_length", "cooldown")

# The labelled children used on every request (a `labels()` lookup takes a lock and hashes the labels).
ACTIVE_HTTP = ACTIVE_STREAMS.labels(api="http")
ACTIVE_GRPC = ACTIVE_STREAMS.labels(api="grpc")


def precreate(routes: Iterable[str]) -> None:
    """Creates the series at zero: each route's 200, each public gRPC method's OK, each retry reason."""
    for route in routes:
        HTTP_REQUESTS.labels(route=route, code="200")
    for method in GRPC_METHODS:
        GRPC_REQUESTS.labels(method=method, code="OK")
    for reason in RETRY_REASONS:
        RETRIES.labels(reason=reason)


def precreate_catalog(catalog: Catalog) -> None:
    """The catalog's series at zero: each route's targets, each chain's steps, each model's cooldown."""
    for route in catalog.routes:
        for target in route.targets:
            ROUTE_DECISIONS.labels(route=route.name, target=catalog.resolve(target).name)
    for model in catalog.models:
        COOLDOWNS.labels(model=model.name)
        COOLING.labels(model=model.name)
        COOLDOWN_PROBES.labels(model=model.name)
        for fallback in catalog.fallbacks(model.name)[:1]:
            for reason in FALLBACK_REASONS:
                FALLBACKS.labels(from_model=model.name, to_model=fallback.name, reason=reason)
