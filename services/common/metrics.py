"""Helpers for Prometheus metrics shared by the services."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from infermesh.common.errors import InfermeshError
from prometheus_client import Counter, Histogram

# Latency buckets from 1 ms to 60 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


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
        requests.labels(method=method, code=code).inc()
        seconds.labels(method=method).observe(time.perf_counter() - started)
