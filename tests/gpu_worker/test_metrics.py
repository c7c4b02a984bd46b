"""The worker's series exist at zero from start, as under `vllm serve`."""

from __future__ import annotations

from infermesh.gpu_worker import metrics
from prometheus_client import REGISTRY


def test_precreate_makes_every_request_series_of_the_model() -> None:
    metrics.precreate("precreated")
    model = {"model_name": "precreated"}
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "infermesh_worker_deadline_exceeded_total"):
        assert REGISTRY.get_sample_value(name, model) == 0, name
    for reason in metrics.FINISH_REASONS:
        assert REGISTRY.get_sample_value("vllm:request_success_total", {**model, "finished_reason": reason}) == 0
    for code in metrics.REFUSED_CODES:
        assert REGISTRY.get_sample_value("infermesh_worker_refused_total", {**model, "code": code}) == 0
