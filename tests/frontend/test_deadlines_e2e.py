"""An HTTP client's deadline (`x-request-timeout`) through a simulated mesh: it bounds the request end to end."""

from __future__ import annotations

import time

import httpx

from tests.frontend.sse import metric_value, scrape, wait_for


def test_a_deadline_that_passes_mid_generation_is_504_and_the_engine_stops(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=5, sim_itl_ms=50)
    body = {"model": mesh.model, "prompt": "Tell me everything.", "max_tokens": 200, "ignore_eos": True}
    started = time.monotonic()
    reply = httpx.post(mesh.url + "/v1/completions", json=body, timeout=30,
                       headers={"x-request-timeout": "0.5", "x-request-id": "deadline-1"})
    took = time.monotonic() - started
    assert reply.status_code == 504, reply.text  # 200 tokens take ~10 s; the deadline ends it at 0.5 s
    assert reply.json()["error"]["code"] == "deadline_exceeded" and took < 3.0, took
    port = mesh.workers[0].metrics_port
    # The engine stopped generating for it: nothing runs, and the worker counted the deadline.
    wait_for(lambda: metric_value(scrape(port), "vllm:num_requests_running") == 0, 5)
    assert metric_value(scrape(port), "infermesh_worker_deadline_exceeded_total") >= 1
    # A deadline that cannot be read is the caller's mistake.
    bad = httpx.post(mesh.url + "/v1/completions", json=body, timeout=10, headers={"x-request-timeout": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-timeout"
    # And the mesh serves the next request at once.
    ok = httpx.post(mesh.url + "/v1/completions", json={**body, "max_tokens": 3}, timeout=30,
                    headers={"x-request-timeout": "20"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
