"""Scenario 9: a soak of mixed load on simulated workers (`make soak`; 5 minutes by default,
INFERMESH_SOAK_SECONDS to change it). After a warm-up, the resident memory of every service
grows by less than 10%, and no request fails."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import httpx
import pytest
from infermesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from tests.reliability.helpers import Load, percentile, tree_rss

SECONDS = float(os.environ.get("INFERMESH_SOAK_SECONDS", "300"))
WARMUP = min(60.0, SECONDS / 5)


@pytest.mark.soak
async def test_soak_mixed_load_memory_flat_no_failures(sim_mesh_factory, report) -> None:
    mesh = sim_mesh_factory(workers=2, sim_ttft_ms=5, sim_itl_ms=5)
    procs = {p.name.split("-")[0] + str(i): p.pid
             for i, p in enumerate([mesh.tokenizer, mesh.frontend, mesh.scheduler, *mesh.workers])}
    failures: list[str] = []
    counts = {"chat": 0, "grpc": 0, "hangups": 0}
    stop = asyncio.Event()
    chat = {"model": mesh.model, "max_tokens": 24, "n": 2, "stop": ["\n\n"],
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a tale"}]}

    async def chats(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            reply = await client.post("/v1/chat/completions", json={**chat, "seed": counts["chat"]})
            if reply.status_code != 200:
                failures.append(f"chat {reply.status_code} {reply.text[:200]}")
            counts["chat"] += 1

    async def hangups(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            async with client.stream("POST", "/v1/completions", json={
                    "model": mesh.model, "prompt": "Long", "max_tokens": 500, "stream": True}) as reply:
                if reply.status_code != 200:
                    failures.append(f"stream {reply.status_code}")
                async for line in reply.aiter_lines():
                    if line.startswith("data: "):
                        break
            counts["hangups"] += 1

    async def grpc_calls() -> None:
        async with grpc.aio.insecure_channel(mesh.frontend.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while not stop.is_set():
                try:
                    async for _ in stub.Generate(inference_pb2.GenerateRequest(
                            model=mesh.model, prompt=f"gRPC {counts['grpc']}",
                            sampling=common_pb2.SamplingParams(max_tokens=16))):
                        pass
                except grpc.aio.AioRpcError as err:
                    failures.append(f"grpc {err.code().name} {err.details()}")
                counts["grpc"] += 1

    samples: list[tuple[float, dict[str, int]]] = []
    started = time.monotonic()
    async with Load(mesh.url, mesh.model, clients=4, max_tokens=32) as load, \
            httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        tasks = [asyncio.create_task(c) for c in (chats(client), chats(client), hangups(client), grpc_calls())]
        while time.monotonic() - started < SECONDS:
            await asyncio.sleep(5)
            samples.append((time.monotonic() - started, {n: tree_rss(pid) for n, pid in procs.items()}))
            assert all(t.done() is False for t in tasks), [t.exception() for t in tasks if t.done()]
        stop.set()
        await asyncio.gather(*tasks)
    after_warmup = [s for t, s in samples if t >= WARMUP]
    base, last = after_warmup[0], after_warmup[-1]
    growth = {n: (last[n] - base[n]) / base[n] for n in procs}
    report("soak", seconds=round(time.monotonic() - started), streams=load.ok, chats=counts["chat"],
           grpc=counts["grpc"], hangups=counts["hangups"], failed=len(load.failures) + len(failures),
           p99_stream_s=percentile(load.latencies, 0.99), rss_mb={n: v >> 20 for n, v in last.items()},
           rss_growth_pct={n: round(g * 100, 1) for n, g in growth.items()})
    assert load.failures == [] and failures == [], (load.failures[:3], failures[:3])
    assert all(g < 0.10 for g in growth.values()), growth
