"""Failures in a simulated mesh: migration off a killed worker, 429, keep-alives, disconnects."""

from __future__ import annotations

import asyncio
import signal

import grpc
import httpx
import pytest
from infermesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from tests.frontend.sse import metric_value, scrape, stream_sse, wait_for

PROMPT = "The history of the mesh begins"


async def test_kill_9_of_a_worker_under_50_streams_loses_no_stream(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=2, sim_ttft_ms=5, sim_itl_ms=10, scheduler={"policy": "least_load"})
    max_tokens = 150  # ~1.5 s per stream
    bodies = [{"model": mesh.model, "prompt": f"{PROMPT} {i}", "max_tokens": max_tokens, "seed": i,
               "stream_options": {"include_usage": True}} for i in range(50)]
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60,
                                 limits=httpx.Limits(max_connections=100)) as client:
        streams = [asyncio.create_task(stream_sse(client, "/v1/completions", b)) for b in bodies]
        victim = mesh.workers[0]
        # Kill once the victim is mid-stream on many requests.
        deadline = asyncio.get_running_loop().time() + 20
        while metric_value(scrape(victim.metrics_port), "vllm:num_requests_running") < 10:
            assert asyncio.get_running_loop().time() < deadline, "the victim never got busy"
            await asyncio.sleep(0.02)
        victim.kill()
        results = await asyncio.gather(*streams)
        references = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    for result, reference in zip(results, references, strict=True):
        assert result.status == 200
        assert not result.errors, result.errors
        assert result.events[-1] == "[DONE]"
        assert result.finish() == "length"
        assert result.usage["completion_tokens"] == max_tokens
        # Whole and unbroken: exactly what an uninterrupted request produces.
        assert result.text() == reference.json()["choices"][0]["text"]
    frontend_metrics = httpx.get(mesh.url + "/metrics").text
    assert metric_value(frontend_metrics, "infermesh_frontend_worker_retries_total") >= 10


async def test_queue_full_is_429_with_retry_after_and_a_queued_stream_waits_for_admission(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=5, sim_itl_ms=20, max_num_seqs=1,
                            scheduler={"max_queue": 1}, frontend={"keepalive": 0.2, "first_event_wait": 0.1})
    body = {"model": mesh.model, "prompt": PROMPT, "max_tokens": 60}
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        first = asyncio.create_task(stream_sse(client, "/v1/completions", body))
        worker_port = mesh.workers[0].metrics_port
        await asyncio.to_thread(wait_for, lambda: metric_value(scrape(worker_port), "vllm:num_requests_running")
                                >= 1, 10)
        queued = asyncio.create_task(stream_sse(client, "/v1/completions", body))
        await asyncio.sleep(0.3)  # let it reach the scheduler's queue
        refused = [await client.post("/v1/completions", json=body) for _ in range(3)]
        done_first, done_queued = await asyncio.gather(first, queued)
        after = await client.post("/v1/completions", json={**body, "max_tokens": 2})
    codes = [r.status_code for r in refused]
    assert 429 in codes, codes
    for reply in refused:
        if reply.status_code == 429:
            assert int(reply.headers["retry-after"]) >= 1
            assert reply.json()["error"]["type"] == "rate_limit_error"
    assert done_first.finish() == done_queued.finish() == "length"
    # The queued stream waited ~1.2 s behind the first with its status pending (admission decides
    # it: 200 once admitted, 429 had the queue refused it), then streamed tokens without gaps.
    assert done_queued.status == 200 and done_queued.comments == 0
    assert after.status_code == 200


async def test_a_disconnect_cancels_the_worker_stream(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=5, sim_itl_ms=20)
    worker_port = mesh.workers[0].metrics_port
    running = lambda: metric_value(scrape(worker_port), "vllm:num_requests_running")  # noqa: E731
    body = {"model": mesh.model, "prompt": PROMPT, "max_tokens": 2000, "stream": True}
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if line.startswith("data: "):
                break
        assert running() == 1
    # The connection is closed here; the client is gone.
    took = await asyncio.to_thread(wait_for, lambda: running() == 0, 2.0)
    assert took < 2.0
    assert metric_value(httpx.get(mesh.url + "/metrics").text, "infermesh_active_streams") == 0


@pytest.mark.parametrize("n", [1, 3])
async def test_no_worker_left_gives_an_error_event_after_the_stream_started(sim_mesh_factory, n: int) -> None:
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=5, sim_itl_ms=20)
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        task = asyncio.create_task(stream_sse(client, "/v1/completions", {
            "model": mesh.model, "prompt": PROMPT, "max_tokens": 500, "n": n}))
        port = mesh.workers[0].metrics_port
        await asyncio.to_thread(wait_for, lambda: metric_value(scrape(port), "vllm:num_requests_running") >= 1, 10)
        await asyncio.sleep(0.2)  # some tokens reached the client
        mesh.workers[0].kill()
        result = await task
    assert result.status == 200
    assert result.text() != ""
    assert len(result.errors) == 1
    assert result.errors[0]["error"]["type"] == "service_unavailable_error"
    assert result.events[-1] == "[DONE]"


async def test_a_client_that_leaves_a_whole_response_cancels_it_too(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=5, sim_itl_ms=20)
    worker_port = mesh.workers[0].metrics_port
    running = lambda: metric_value(scrape(worker_port), "vllm:num_requests_running")  # noqa: E731
    body = {"model": mesh.model, "prompt": PROMPT, "max_tokens": 2000}
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        request = asyncio.create_task(client.post("/v1/completions", json=body))
        await asyncio.to_thread(wait_for, lambda: running() == 1, 10)
        request.cancel()  # the client gives up and closes its connection
        with pytest.raises(asyncio.CancelledError):
            await request
    took = await asyncio.to_thread(wait_for, lambda: running() == 0, 2.0)
    assert took < 2.0
    after = httpx.post(mesh.url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=30)
    assert after.status_code == 200


async def test_sigterm_drains_in_flight_streams_then_exits_0(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=5, sim_itl_ms=20)
    body = {"model": mesh.model, "prompt": PROMPT, "max_tokens": 60, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        task = asyncio.create_task(stream_sse(client, "/v1/completions", body))
        port = mesh.workers[0].metrics_port
        await asyncio.to_thread(wait_for, lambda: metric_value(scrape(port), "vllm:num_requests_running") >= 1, 10)
        mesh.frontend.signal(signal.SIGTERM)
        # Draining: the edge is told at once, and what still arrives is served.
        health = await asyncio.wait_for(_poll_until_draining(client), 10)
        assert health.json() == {"status": "draining"}
        assert health.headers["x-envoy-immediate-health-check-fail"] == "true"
        late = await client.post("/v1/completions", json={**body, "max_tokens": 3, "stream": False})
        assert late.status_code == 200 and late.json()["usage"]["completion_tokens"] == 3
        assert late.headers["x-envoy-immediate-health-check-fail"] == "true"
        result = await task
    assert result.events[-1] == "[DONE]" and not result.errors
    assert result.usage["completion_tokens"] == 60
    assert await asyncio.to_thread(mesh.frontend.wait, 15) == 0


async def _poll_until_draining(client: httpx.AsyncClient) -> httpx.Response:
    while True:
        reply = await client.get("/health")
        if reply.status_code == 503:
            return reply
        await asyncio.sleep(0.02)


async def test_a_cancelled_grpc_generate_cancels_the_worker_stream(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=5, sim_itl_ms=20)
    port = mesh.workers[0].metrics_port
    running = lambda: metric_value(scrape(port), "vllm:num_requests_running")  # noqa: E731
    async with grpc.aio.insecure_channel(mesh.frontend.address) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(inference_pb2.GenerateRequest(
            model=mesh.model, prompt=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=2000)))
        first = await call.read()
        assert first.text or first.token_ids
        assert running() == 1
        call.cancel()
    took = await asyncio.to_thread(wait_for, lambda: running() == 0, 2.0)
    assert took < 2.0


async def test_a_matched_stop_string_frees_the_engine_at_once(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=5, sim_itl_ms=10)
    port = mesh.workers[0].metrics_port
    running = lambda: metric_value(scrape(port), "vllm:num_requests_running")  # noqa: E731
    body = {"model": mesh.model, "prompt": PROMPT, "seed": 11}
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        text = (await client.post("/v1/completions", json={**body, "max_tokens": 20})).json()["choices"][0]["text"]
        stop = text.split(" ")[10]  # a word some tokens in
        reply = (await client.post("/v1/completions", json={**body, "max_tokens": 3000, "stop": [stop]})).json()
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] < 20
    # Without cancelling, the engine would run the remaining ~2,990 tokens (30 s).
    assert await asyncio.to_thread(wait_for, lambda: running() == 0, 2.0) < 2.0


async def test_requests_of_n_choices_at_capacity_are_never_refused_by_a_worker(sim_mesh_factory) -> None:
    # 40 requests of 2 to 4 choices (~120 sequences) on 2 workers of 4 sequences: the scheduler must
    # reserve every choice's sequence and tokens, or the workers refuse and the frontend retries.
    mesh = sim_mesh_factory(workers=2, max_num_seqs=4, sim_ttft_ms=5, sim_itl_ms=5,
                            scheduler={"policy": "least_load"})
    bodies = [{"model": mesh.model, "prompt": f"{PROMPT} {i}", "max_tokens": 20, "n": 2 + i % 3, "seed": i}
              for i in range(40)]
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60,
                                 limits=httpx.Limits(max_connections=100)) as client:
        replies = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
        metrics = (await client.get("/metrics")).text
    for body, reply in zip(bodies, replies, strict=True):
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["choices"]) == body["n"]
        assert reply.json()["usage"]["completion_tokens"] == 20 * body["n"]
    assert metric_value(metrics, "infermesh_frontend_worker_retries_total") == 0


async def test_a_slow_first_token_gets_no_early_keepalive(sim_mesh_factory) -> None:
    # The first token takes longer than the wait for a quick error, but less than a keep-alive interval:
    # the stream carries data only (a lone comment first trips some SSE clients, vLLM's load generator one).
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=600, sim_itl_ms=5,
                            frontend={"keepalive": 3.0, "first_event_wait": 0.2})
    body = {"model": mesh.model, "prompt": PROMPT, "max_tokens": 4}
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json={**body, "stream": True}) as reply:
        raw = b"".join([chunk async for chunk in reply.aiter_raw()]).decode()
    assert reply.status_code == 200
    assert raw.startswith("data: ") and ": keep-alive" not in raw
    assert raw.rstrip().endswith("data: [DONE]")


async def occupy_the_only_slot(client: httpx.AsyncClient, mesh, body: dict) -> asyncio.Task:
    """Starts a stream and returns once the (single-slot) worker runs it."""
    first = asyncio.create_task(stream_sse(client, "/v1/completions", body))
    worker_port = mesh.workers[0].metrics_port
    await asyncio.to_thread(wait_for, lambda: metric_value(scrape(worker_port), "vllm:num_requests_running")
                            >= 1, 10)
    return first


async def test_a_request_that_waits_past_the_queue_timeout_gets_429(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=5, sim_itl_ms=20, max_num_seqs=1,
                            scheduler={"queue_timeout": 0.3})
    body = {"model": mesh.model, "prompt": PROMPT, "max_tokens": 60}
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        first = await occupy_the_only_slot(client, mesh, body)
        late = await client.post("/v1/completions", json={**body, "max_tokens": 2})
        assert (await first).finish() == "length"
    assert late.status_code == 429, late.text
    assert late.json()["error"]["type"] == "rate_limit_error"
    assert int(late.headers["retry-after"]) >= 1


async def test_a_stream_queued_past_the_first_event_wait_still_gets_429(sim_mesh_factory) -> None:
    # The status of a stream follows admission, not the clock: queued longer than the first-event
    # wait and then refused is an HTTP 429, not a 200 whose stream carries an error event.
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=5, sim_itl_ms=20, max_num_seqs=1,
                            scheduler={"queue_timeout": 1.0}, frontend={"first_event_wait": 0.2})
    body = {"model": mesh.model, "prompt": PROMPT, "max_tokens": 80}
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        first = await occupy_the_only_slot(client, mesh, body)
        started = asyncio.get_running_loop().time()
        late = await client.post("/v1/completions", json={**body, "max_tokens": 2, "stream": True})
        waited = asyncio.get_running_loop().time() - started
        assert (await first).finish() == "length"
    assert late.status_code == 429, late.text
    assert late.json()["error"]["type"] == "rate_limit_error"
    assert waited >= 0.9, f"answered after {waited:.2f} s, before the queue timeout"


async def test_a_stream_admitted_after_the_first_event_wait_streams_normally(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=5, sim_itl_ms=20, max_num_seqs=1,
                            scheduler={"queue_timeout": 10.0}, frontend={"first_event_wait": 0.2})
    body = {"model": mesh.model, "prompt": PROMPT, "max_tokens": 30}
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        first = await occupy_the_only_slot(client, mesh, body)
        second = await stream_sse(client, "/v1/completions", {**body, "max_tokens": 3})
        assert (await first).finish() == "length"
    assert second.status == 200 and second.finish() == "length"


async def test_an_admitted_stream_hears_keepalives_until_a_slow_first_token(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=1, sim_ttft_ms=1500, sim_itl_ms=5,
                            frontend={"keepalive": 0.3, "first_event_wait": 0.2})
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        reply = await stream_sse(client, "/v1/completions", {"model": mesh.model, "prompt": PROMPT, "max_tokens": 3})
    assert reply.status == 200 and reply.finish() == "length"
    assert reply.comments >= 2
