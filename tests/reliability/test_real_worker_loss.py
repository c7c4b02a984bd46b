"""Scenario 1 on the real engine: kill -9 of the session's real-engine worker under streams.

It is marked `kills_real_worker`, which the suite's collection hook (tests/conftest.py) runs after
every other test: it is the last to use the session's one real worker (`real_worker`), and it kills
it. A simulated worker serving the same model survives, and every stream must end whole.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.mesh import start_frontend, start_scheduler
from tests.fixtures.worker import WorkerHandle, start_sim_worker
from tests.frontend.sse import metric_value, stream_sse, wait_for
from tests.reliability.helpers import stream_ok

STREAMS = 6
MAX_TOKENS = 40

@pytest.mark.engine
@pytest.mark.kills_real_worker
async def test_kill_9_of_the_real_engine_worker_loses_no_stream(real_worker: WorkerHandle, tokenizer_proc: Any,
                                                                model_dir: Path, tmp_path: Path, report) -> None:
    survivor = start_sim_worker(tmp_path, model_dir, sim_ttft_ms=5, sim_itl_ms=10)
    sched = start_scheduler(tmp_path, [real_worker.address, survivor.address], policy="least_load")
    front = start_frontend(tmp_path, tokenizer_proc.address, sched.address).wait_ready()
    try:
        bodies = [{"model": real_worker.model, "prompt": f"Tell me about rivers, part {i}.", "max_tokens": MAX_TOKENS,
                   "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}
                  for i in range(STREAMS)]
        async with httpx.AsyncClient(base_url=front.url, timeout=300) as client:
            streams = [asyncio.create_task(stream_sse(client, "/v1/completions", b)) for b in bodies]
            await asyncio.to_thread(wait_for, lambda: metric_value(
                real_worker.metrics_text(), "vllm:num_requests_running") >= 1, 120)
            # Tokens have reached the clients: the streams are truly under way on the real engine.
            await asyncio.to_thread(wait_for, lambda: metric_value(
                scrape_frontend(front.url), "infermesh_generation_tokens_total") >= STREAMS, 120)
            running = metric_value(real_worker.metrics_text(), "vllm:num_requests_running")
            real_worker.proc.killed_on_purpose = True  # type: ignore[attr-defined]
            real_worker.proc.kill()
            killed = time.monotonic()
            results = await asyncio.gather(*streams)
            took = time.monotonic() - killed
        retries = metric_value(scrape_frontend(front.url), "infermesh_frontend_worker_retries_total")
    finally:
        front.stop()
        sched.stop()
        survivor.stop()
    whole = [stream_ok(r, MAX_TOKENS) for r in results]
    report("real-worker-loss", streams=STREAMS, running_on_real=int(running), failed_or_truncated=whole.count(False),
           resumed=int(retries), finished_after_kill_s=took)
    assert running >= 1 and retries >= 1
    assert all(whole), [r.events[-2:] for r, ok in zip(results, whole, strict=True) if not ok]

def scrape_frontend(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=5).text
