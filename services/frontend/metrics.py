"""The frontend's Prometheus metrics (served on its HTTP port at /metrics)."""

from __future__ import annotations

from infermesh.common.metrics import LATENCY_BUCKETS
from prometheus_client import Counter, Gauge, Histogram

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
# The labelled children used on every request (a `labels()` lookup takes a lock and hashes the labels).
ACTIVE_HTTP = ACTIVE_STREAMS.labels(api="http")
ACTIVE_GRPC = ACTIVE_STREAMS.labels(api="grpc")
