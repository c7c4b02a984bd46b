"""Scenario 1: kill -9 of one of two simulated workers at a random moment under 200 streams.

Every stream must end whole: 200, no error event, every token, and exactly the
text an uninterrupted request produces (the frontend resumes the stream on the
surviving worker from the prompt plus the tokens already sent).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import httpx
import pytest

from tests.frontend.sse import metric_value, scrape, stream_sse
from tests.reliability.helpers import stream_ok

STREAMS = 200
MAX_TOKENS = 80
ITL_MS = 25  # ~2 s per stream: the kill lands while the victim streams even on a loaded machine


@pytest.mark.parametrize("run", [1, 2, 3])
async def test_kill_9_of_a_worker_under_200_streams(sim_mesh_factory, report, run: int) -> None:
    mesh = sim_mesh_factory(workers=2, sim_ttft_ms=5, sim_itl_ms=ITL_MS, scheduler={"policy": "least_load"})
    rng = random.Random(run)
    bodies = [{"model": mesh.model, "prompt": f"Worker loss run {run} stream {i}", "max_tokens": MAX_TOKENS,
               "seed": i, "stream_options": {"include_usage": True}} for i in range(STREAMS)]
    async with httpx.AsyncClient(base_url=mesh.url, timeout=120,
                                 limits=httpx.Limits(max_connections=STREAMS + 10)) as client:
        victim = mesh.workers[rng.randrange(2)]
        started = time.monotonic()
        streams = [asyncio.create_task(stream_sse(client, "/v1/completions", b)) for b in bodies]
        # A random moment while the victim is streaming, chosen by its progress rather than by the clock
        # (on a busy machine a random sleep can land after the victim's streams are all done): once the
        # streams it runs have made between 1 token and 40% of their tokens.
        deadline = time.monotonic() + 30
        while True:
            text = await asyncio.to_thread(scrape, victim.metrics_port)
            holding = metric_value(text, "vllm:num_requests_running")
            if holding >= 1:
                break
            assert time.monotonic() < deadline, "the victim never got a request"
            await asyncio.sleep(0.01)
        target = metric_value(text, "vllm:generation_tokens_total") + rng.randint(1, int(holding * MAX_TOKENS * 0.4))
        while metric_value(text := await asyncio.to_thread(scrape, victim.metrics_port),
                           "vllm:generation_tokens_total") < target:
            assert time.monotonic() < deadline, "the victim stopped making progress"
            await asyncio.sleep(0.01)
        # Frozen at once, then killed: what it was running at that scrape is what the kill interrupts
        # (a second scrape would give it time to finish more streams).
        running = metric_value(text, "vllm:num_requests_running")
        victim.signal(signal.SIGSTOP)
        victim.kill()
        killed_at = time.monotonic() - started
        results = await asyncio.gather(*streams)
        took = time.monotonic() - started
        references = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    whole = [stream_ok(r, MAX_TOKENS) for r in results]
    same = [r.text() == ref.json()["choices"][0]["text"] for r, ref in zip(results, references, strict=True)]
    retries = metric_value(httpx.get(mesh.url + "/metrics").text, "infermesh_frontend_worker_retries_total")
    report("worker-loss", run=run, streams=STREAMS, killed_at_s=killed_at, running_on_victim=int(running),
           failed_or_truncated=whole.count(False), text_differs=same.count(False), resumed=int(retries),
           all_done_s=took)
    assert whole.count(False) == 0, [r.events[-3:] for r, ok in zip(results, whole, strict=True) if not ok][:3]
    assert same.count(False) == 0
    # The kill hit streams in flight, and they were resumed elsewhere.
    assert running >= 1 and retries >= 1
