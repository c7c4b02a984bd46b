"""Helpers for Prometheus metrics shared by the services."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from infermesh.common.errors import InfermeshError
from prometheus_client import Counter, Histogram

# Latency buckets from 1 ms to 60 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


@functools.lru_cache(maxsize=1024)
def _child(metric: Any, method: str, code: str | None = None) -> Any:
    """A labelled series, looked up once per (metric, method, code) rather than per call."""
    return metric.labels(method=method) if code is None else metric.labels(method=method, code=code)


@contextmanager
def observe_call(requests: Counter, seconds: Histogram, method: str) -> Iterator[None]:
    """Counts a call by method and gRPC code, and times it."""
    started = time.perf_counter()
    code = "OK"
    try:
        yield
    except InfermeshError as exc:
        code = exc.code.name
        raise
    except BaseException:
        code = "INTERNAL"
        raise
    finally:
        _child(requests, method, code).inc()
        _child(seconds, method).observe(time.perf_counter() - started)
