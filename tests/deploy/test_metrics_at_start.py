"""On a freshly started simulated mesh, before any request, every service's /metrics
already lists each metric family for the model it serves, at zero: a Prometheus
alert or a KEDA query reads 0, not "no data" (as under `vllm serve`)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from infermesh.frontend import metrics as frontend_metrics
from infermesh.gpu_worker import metrics as worker_metrics
from infermesh.scheduler import metrics as scheduler_metrics
from infermesh.scheduler.admission import PRIORITY_NAMES
from infermesh.tokenizer.service import METHODS as TOKENIZER_METHODS
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.fixtures.mesh import build_sim_mesh
from tests.harness import ServiceProcess, free_port

POLICY = "prefix_affinity"
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")
Expected = Sequence[tuple[str, dict[str, str]]]


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


@pytest.fixture(scope="module")
def scraped(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[Sample]]]:
    """Each service's samples, scraped once the mesh is healthy and before any request."""
    log_dir = tmp_path_factory.mktemp("metrics-at-start")
    port, tokenizer_metrics, scheduler_metrics_port = free_port(), free_port(), free_port()
    # A tokenizer of its own: the session's shared one has served other tests.
    with ServiceProcess("tokenizer", ["tokenizer", "--port", str(port), "--metrics-port", str(tokenizer_metrics),
                                      "--model", str(model_dir)], port=port, log_dir=log_dir) as tokenizer:
        tokenizer.start().wait_healthy(60)
        mesh = build_sim_mesh(log_dir, model_dir, tokenizer, workers=1,
                              scheduler={"metrics_port": scheduler_metrics_port, "policy": POLICY})
        try:
            yield {"tokenizer": scrape(tokenizer_metrics), "scheduler": scrape(scheduler_metrics_port),
                   "worker": scrape(mesh.workers[0].metrics_port),  # type: ignore[attr-defined]
                   "frontend": scrape(mesh.frontend.http_port)}
        finally:
            mesh.stop()


def value(samples: list[Sample], name: str, labels: dict[str, str]) -> float | None:
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def check(samples: list[Sample], expected: Expected, started: Expected = ()) -> None:
    """Every expected series is there at 0; those the mesh's start-up calls (`started`) only there."""
    missing = [(name, labels) for name, labels in expected if value(samples, name, labels) is None]
    assert not missing, f"series absent before the first request: {missing}"
    nonzero = [(name, labels, value(samples, name, labels)) for name, labels in expected
               if (name, labels) not in started and value(samples, name, labels) != 0]
    assert not nonzero, f"series not at zero before the first request: {nonzero}"


def test_tokenizer(scraped: dict[str, list[Sample]], model_dir: Path) -> None:
    expected: Expected = [
        *(("infermesh_tokenizer_requests_total", {"method": m, "code": "OK"}) for m in TOKENIZER_METHODS),
        *(("infermesh_tokenizer_request_seconds_count", {"method": m}) for m in TOKENIZER_METHODS),
        ("infermesh_tokenizer_tokens_total", {"model": model_dir.name}),
    ]
    # The frontend fetches the tokenizer and lists the models as it starts.
    started = [(name, labels) for name, labels in expected if labels.get("method") in ("GetTokenizer", "ListModels")]
    check(scraped["tokenizer"], expected, started)


def test_scheduler(scraped: dict[str, list[Sample]], model_dir: Path) -> None:
    model = {"model": model_dir.name}
    check(scraped["scheduler"], [
        *(("infermesh_scheduler_queue_depth", {**model, "priority": p}) for p in PRIORITY_NAMES.values()),
        ("infermesh_scheduler_admitted_total", model),
        ("infermesh_scheduler_queue_time_seconds_count", model),
        *(("infermesh_scheduler_rejected_total", {"reason": r}) for r in scheduler_metrics.REJECT_REASONS),
        *(("infermesh_scheduler_routing_decisions_total", {"policy": POLICY, "outcome": o})
          for o in scheduler_metrics.ROUTING_OUTCOMES[POLICY]),
        *(("infermesh_scheduler_leases_ended_total", {"how": h}) for h in scheduler_metrics.LEASE_ENDINGS),
    ])
    # Only the outcomes of the policy in use.
    assert value(scraped["scheduler"], "infermesh_scheduler_routing_decisions_total",
                 {"policy": "round_robin"}) is None


def test_worker(scraped: dict[str, list[Sample]], model_dir: Path) -> None:
    model = {"model_name": model_dir.name}
    check(scraped["worker"], [
        ("vllm:prompt_tokens_total", model),
        ("vllm:generation_tokens_total", model),
        ("vllm:time_to_first_token_seconds_count", model),
        ("vllm:inter_token_latency_seconds_count", model),
        ("vllm:e2e_request_latency_seconds_count", model),
        ("infermesh_worker_deadline_exceeded_total", model),
        *(("vllm:request_success_total", {**model, "finished_reason": r}) for r in worker_metrics.FINISH_REASONS),
        *(("infermesh_worker_refused_total", {**model, "code": c}) for c in worker_metrics.REFUSED_CODES),
    ])


def test_frontend(scraped: dict[str, list[Sample]]) -> None:
    # The mesh's readiness polls of /health.
    health: Expected = [("infermesh_http_requests_total", {"route": "/health", "code": "200"})]
    check(scraped["frontend"], [
        *(("infermesh_http_requests_total", {"route": r, "code": "200"}) for r in OPENAI_ROUTES),
        *health,
        *(("infermesh_frontend_grpc_requests_total", {"method": m, "code": "OK"})
          for m in frontend_metrics.GRPC_METHODS),
        *(("infermesh_active_streams", {"api": api}) for api in ("http", "grpc")),
        *(("infermesh_frontend_worker_retries_total", {"reason": r}) for r in frontend_metrics.RETRY_REASONS),
    ], health)
