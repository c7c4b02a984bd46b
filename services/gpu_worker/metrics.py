"""The worker's Prometheus metrics, under vLLM's own names and labels.

Dashboards, KEDA rules and the Gateway API Inference Extension written for
`vllm serve` read these unchanged. Both engines export the same series from
this module (vLLM's own Prometheus logger is turned off, so nothing clashes).
As under `vllm serve`, the model's series exist from start, at zero
(`precreate`), so that a query reads 0 rather than "no data".
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from infermesh.gpu_worker.engine import Delta, EngineLoad
from infermesh.v1 import worker_pb2
from prometheus_client import Counter, Gauge, Histogram

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

FINISH_REASONS = ("stop", "length", "abort")
# The gRPC codes Generate refuses a call with.
REFUSED_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "NOT_FOUND", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED")

RUNNING = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", ["model_name"])
WAITING = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", ["model_name"])
KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", ["model_name"])
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", ["model_name"])
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Number of generation tokens processed.", ["model_name"])
TTFT = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                 ["model_name"], buckets=_TTFT_BUCKETS)
ITL = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                ["model_name"], buckets=_ITL_BUCKETS)
E2E = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                ["model_name"], buckets=_E2E_BUCKETS)
SUCCESS = Counter("vllm:request_success", "Count of successfully processed requests.",
                  ["model_name", "finished_reason"])
PREFIX_HIT_RATE = Gauge("infermesh_worker_prefix_cache_hit_rate", "Prefix-cache hit rate over recent requests.",
                        ["model_name"])
REFUSED = Counter("infermesh_worker_refused_total", "Generate calls refused, by gRPC code.", ["model_name", "code"])
DEADLINE_EXCEEDED = Counter("infermesh_worker_deadline_exceeded_total",
                            "Generate calls whose caller's deadline passed: refused on arrival, or aborted "
                            "in the engine while generating.", ["model_name"])


def export_load(model: str, load: Callable[[], EngineLoad]) -> None:
    """Gauges read the engine's load at scrape time."""
    RUNNING.labels(model_name=model).set_function(lambda: load().running)
    WAITING.labels(model_name=model).set_function(lambda: load().waiting)
    KV_USAGE.labels(model_name=model).set_function(lambda: load().kv_cache_usage)
    PREFIX_HIT_RATE.labels(model_name=model).set_function(lambda: load().prefix_cache_hit_rate)


def precreate(model: str) -> None:
    """Creates the model's request series at zero."""
    _children(model)
    PROMPT_TOKENS.labels(model_name=model)
    E2E.labels(model_name=model)
    for reason in FINISH_REASONS:
        SUCCESS.labels(model_name=model, finished_reason=reason)
    for code in REFUSED_CODES:
        REFUSED.labels(model_name=model, code=code)
    DEADLINE_EXCEEDED.labels(model_name=model)


@functools.lru_cache(maxsize=16)
def _children(model: str) -> tuple[Any, Any, Any]:
    """The per-token series of a model, looked up once (not per token)."""
    return (TTFT.labels(model_name=model), ITL.labels(model_name=model),
            GENERATION_TOKENS.labels(model_name=model))


class RequestMetrics:
    """Timings and counts of one request, fed with each delta it streams."""

    def __init__(self, model: str, prompt_tokens: int) -> None:
        self.model = model
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.ttft, self.itl, self.generated = _children(model)
        PROMPT_TOKENS.labels(model_name=model).inc(prompt_tokens)

    def on_delta(self, delta: Delta) -> None:
        count = len(delta.token_ids)
        if not count:
            return
        now = time.perf_counter()
        self.tokens += count
        if self.last is None:
            self.first = now
            self.ttft.observe(now - self.started)
        else:
            gap = (now - self.last) / count
            for _ in range(count):
                self.itl.observe(gap)
        self.last = now
        self.generated.inc(count)

    def result(self, lease_id: str, outcome: int) -> worker_pb2.LeaseResult | None:
        """How the request ended, for the schedulers (None without a lease: nobody analyses it)."""
        if not lease_id:
            return None
        ttft = self.first - self.started if self.first is not None else 0.0
        tpot = (self.last - self.first) / (self.tokens - 1) if self.first is not None and self.last is not None \
            and self.tokens > 1 else 0.0
        return worker_pb2.LeaseResult(lease_id=lease_id, outcome=worker_pb2.LeaseResult.Outcome.ValueType(outcome),
                                      ttft_s=ttft, tpot_s=tpot)

    def on_finish(self, finish_reason: str) -> None:
        E2E.labels(model_name=self.model).observe(time.perf_counter() - self.started)
        SUCCESS.labels(model_name=self.model, finished_reason=finish_reason).inc()
