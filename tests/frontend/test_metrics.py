"""The frontend's labelled series exist at zero once `precreate` ran."""

from __future__ import annotations

from infermesh.frontend import metrics
from prometheus_client import REGISTRY


def test_precreate_makes_routes_methods_and_retry_reasons() -> None:
    metrics.precreate(["/precreated"])
    assert REGISTRY.get_sample_value("infermesh_http_requests_total", {"route": "/precreated", "code": "200"}) == 0
    assert metrics.GRPC_METHODS == ("Generate", "ListModels", "Embed")
    for method in metrics.GRPC_METHODS:
        assert REGISTRY.get_sample_value("infermesh_frontend_grpc_requests_total",
                                         {"method": method, "code": "OK"}) is not None
    for reason in metrics.RETRY_REASONS:
        assert REGISTRY.get_sample_value("infermesh_frontend_worker_retries_total", {"reason": reason}) is not None
    for api in ("http", "grpc"):
        assert REGISTRY.get_sample_value("infermesh_active_streams", {"api": api}) is not None
