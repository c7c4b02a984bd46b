"""Scenarios 2-4: rolling restart behind Envoy, scheduler restart, tokenizer down.

The services are restarted on the same ports (as a supervisor or Kubernetes
would), under load, and the clients' view is measured.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import httpx
from infermesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from tests.deploy.envoy_proc import EnvoyProcess
from tests.fixtures.mesh import build_sim_mesh, start_frontend
from tests.fixtures.scheduler import wait_workers
from tests.frontend.sse import metric_value, scrape, stream_sse, wait_for
from tests.harness import ServiceProcess, free_port
from tests.reliability.helpers import Load, percentile, restart_same_port, stream_ok


def _healthy_frontends(envoy: EnvoyProcess) -> int:
    return envoy.stats().get("cluster.frontend_http.membership_healthy", 0)


async def _sigterm_and_restart(proc: ServiceProcess) -> tuple[ServiceProcess, float]:
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0, f"{proc.name} exited with {code} on SIGTERM:\n{proc.log()[-3000:]}"
    drained = time.monotonic() - started
    return await asyncio.to_thread(restart_same_port, proc), drained


async def test_rolling_restart_of_every_worker_and_frontend_behind_envoy(sim_mesh_factory, report,
                                                                       tmp_path: Path) -> None:
    mesh = sim_mesh_factory(workers=2, sim_ttft_ms=5, sim_itl_ms=10)
    fronts = [mesh.frontend, start_frontend(tmp_path, mesh.tokenizer.address, mesh.scheduler.address).wait_ready()]
    mesh.owned.append(fronts[1])
    envoy = EnvoyProcess([(f.http_port, f.port) for f in fronts], tmp_path).start()
    try:
        envoy.wait_ready()
        await asyncio.to_thread(wait_for, lambda: _healthy_frontends(envoy) == 2, 15)
        drains = []
        async with Load(envoy.url, mesh.model, clients=8, max_tokens=20) as load:
            await load.wait_ok(20)
            for i, worker in enumerate(list(mesh.workers)):
                load.phase = f"worker {i}"
                fresh, drained = await _sigterm_and_restart(worker)
                drains.append(drained)
                mesh.workers[i] = fresh
                mesh.owned[mesh.owned.index(worker)] = fresh
                await asyncio.to_thread(wait_workers, mesh.scheduler.address, 2)
                await load.wait_ok(20)
            for i, front in enumerate(list(fronts)):
                load.phase = f"frontend {i}"
                fresh, drained = await _sigterm_and_restart(front)
                drains.append(drained)
                fronts[i] = fresh
                mesh.owned[mesh.owned.index(front)] = fresh
                await asyncio.to_thread(fresh.wait_ready)
                await asyncio.to_thread(wait_for, lambda: _healthy_frontends(envoy) == 2, 15)
                await load.wait_ok(20)
    finally:
        envoy.stop()
    report("rolling-restart", restarts=4, requests_ok=load.ok, failed=len(load.failures),
           drain_s=max(drains), p99_latency_s=percentile(load.latencies, 0.99))
    refused = [line for line in envoy.log().splitlines() if '"status":503' in line]
    assert load.failures == [], (load.failures[:5], refused[:3])


async def test_scheduler_restart_in_flight_streams_finish_new_requests_never_hang(sim_mesh_factory, report) -> None:
    mesh = sim_mesh_factory(workers=2, sim_ttft_ms=5, sim_itl_ms=20)
    max_tokens = 100  # ~2 s per stream
    bodies = [{"model": mesh.model, "prompt": f"Scheduler restart {i}", "max_tokens": max_tokens, "seed": i,
               "stream_options": {"include_usage": True}} for i in range(20)]
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60,
                                 limits=httpx.Limits(max_connections=60)) as client:
        streams = [asyncio.create_task(stream_sse(client, "/v1/completions", b)) for b in bodies]
        ports = [w.metrics_port for w in mesh.workers]
        await asyncio.to_thread(wait_for, lambda: sum(
            metric_value(scrape(p), "vllm:num_requests_running") for p in ports) >= 20, 15)
        mesh.scheduler.kill()
        down_started = time.monotonic()

        async def timed(i: int) -> tuple[int, float, str]:
            started = time.monotonic()
            reply = await client.post("/v1/completions", json={**bodies[i], "max_tokens": 4},
                                      headers={"x-request-id": f"sched-down-{i}"})
            message = reply.json().get("error", {}).get("message", "") if reply.status_code != 200 else ""
            return reply.status_code, time.monotonic() - started, message
        during = await asyncio.gather(*(timed(i) for i in range(10)))
        results = await asyncio.gather(*streams)
        fresh = await asyncio.to_thread(restart_same_port, mesh.scheduler)
        mesh.owned[mesh.owned.index(mesh.scheduler)] = fresh
        mesh.scheduler = fresh
        back = await asyncio.to_thread(wait_for, lambda: httpx.post(
            mesh.url + "/v1/completions", json={**bodies[0], "max_tokens": 4}, timeout=30).status_code == 200, 30, 0.2)
        downtime = time.monotonic() - down_started
    whole = sum(stream_ok(r, max_tokens) for r in results)
    codes = sorted({c for c, _, _ in during})
    slowest = max(t for _, t, _ in during)
    report("scheduler-restart", in_flight=len(results), finished_whole=whole, requests_while_down=len(during),
           codes=codes, slowest_reply_s=slowest, success_again_after_s=back, downtime_s=downtime)
    assert whole == len(results), [r.events[-2:] for r in results if not stream_ok(r, max_tokens)][:3]
    assert set(codes) <= {200, 503}, during
    # A 503 says only what a client can act on, with the request id; the frontend's log says what is down.
    log = mesh.frontend.log()
    for i, (code, _, message) in enumerate(during):
        if code == 503:
            assert f"sched-down-{i}" in message and "scheduler" not in message, message
            assert any(f"[sched-down-{i}]" in line and "scheduler is unavailable" in line
                       for line in log.splitlines()), f"sched-down-{i}"
    assert slowest < 5.0, during


def _tokenizer(model_dir: Path, log_dir: Path, port: int) -> ServiceProcess:
    return ServiceProcess("own-tokenizer", ["tokenizer", "--port", str(port), "--metrics-port", "0",
                                            "--model", str(model_dir)], port=port, log_dir=log_dir)


async def test_tokenizer_down_gives_a_fast_clear_503_and_recovers(model_dir: Path, tmp_path: Path, report) -> None:
    tok = _tokenizer(model_dir, tmp_path, free_port()).start().wait_healthy(60)
    mesh = build_sim_mesh(tmp_path, model_dir, tok, workers=1, sim_ttft_ms=0, sim_itl_ms=0)
    chat = {"model": mesh.model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hello there"}]}
    completion = {"model": mesh.model, "max_tokens": 4, "prompt": "Hello there"}
    try:
        async with httpx.AsyncClient(base_url=mesh.url, timeout=30) as client:
            assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
            tok.kill()
            replies = []
            for i, (path, body) in enumerate([("/v1/chat/completions", chat), ("/v1/completions", completion)] * 5):
                started = time.monotonic()
                reply = await client.post(path, json=body, headers={"x-request-id": f"tok-down-{i}"})
                replies.append((reply.status_code, time.monotonic() - started, reply.json()["error"]))
            streamed = await stream_sse(client, "/v1/chat/completions", chat)
            async with grpc.aio.insecure_channel(mesh.frontend.address) as channel:
                call = inference_pb2_grpc.InferenceStub(channel).Generate(inference_pb2.GenerateRequest(
                    model=mesh.model, prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=4),
                    request_id="tok-down-grpc"))
                try:
                    await call.read()
                    grpc_code, grpc_details = grpc.StatusCode.OK, ""
                except grpc.aio.AioRpcError as err:
                    grpc_code, grpc_details = err.code(), err.details() or ""
            log = mesh.frontend.log()
            restarted = time.monotonic()
            tok = _tokenizer(model_dir, tmp_path, tok.port).start().wait_healthy(60)
            back = await asyncio.to_thread(wait_for, lambda: httpx.post(
                mesh.url + "/v1/chat/completions", json=chat, timeout=30).status_code == 200, 30, 0.2)
            recovered = time.monotonic() - restarted
    finally:
        mesh.stop()
        tok.stop()
    report("tokenizer-down", requests=len(replies), codes=sorted({c for c, _, _ in replies}),
           slowest_503_s=max(t for _, t, _ in replies), stream_status=streamed.status, grpc=grpc_code.name,
           success_after_restart_s=recovered, first_success_poll_s=back)
    for i, (code, took, error) in enumerate(replies):
        assert code == 503 and took < 2.0, (code, took, error)
        # The body says what a client can act on (and the request id); what is down is in the log.
        assert error["type"] == "service_unavailable_error" and "tokenizer" not in error["message"], error
        assert f"tok-down-{i}" in error["message"], error
        assert any(f"[tok-down-{i}]" in line and "tokenizer is unavailable" in line for line in log.splitlines())
    assert streamed.status == 503
    assert grpc_code == grpc.StatusCode.UNAVAILABLE and "tokenizer" not in grpc_details
    assert any("[tok-down-grpc]" in line and "tokenizer is unavailable" in line for line in log.splitlines())
