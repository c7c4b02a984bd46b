"""kill -9 of a real-engine worker in the middle of `json_schema` streams: each stream resumes on the other
real worker under the same grammar (advanced over the tokens already sent) and its whole text validates.

The victim is a second real worker started for this test; the survivor is the session's `real_worker`.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.fixtures.mesh import start_frontend, start_scheduler
from tests.fixtures.worker import WorkerHandle, start_real_worker
from tests.frontend.sse import metric_value, stream_sse, wait_for

pytestmark = pytest.mark.engine

STREAMS = 4
SCHEMA = {
    "type": "object",
    "properties": {"cities": {"type": "array", "minItems": 6, "maxItems": 6, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "country": {"type": "string", "maxLength": 12},
                                         "rank": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["name", "country", "rank"], "additionalProperties": False}}},
    "required": ["cities"], "additionalProperties": False,
}


async def test_kill_9_mid_json_schema_stream_keeps_the_constraint(real_worker: WorkerHandle, tokenizer_proc: Any,
                                                                   model_dir: Path, tmp_path: Path, report) -> None:
    victim = start_real_worker(tmp_path, model_dir)
    sched = start_scheduler(tmp_path, [victim.address, real_worker.address], policy="round_robin")
    front = start_frontend(tmp_path, tokenizer_proc.address, sched.address).wait_ready()
    fmt = {"type": "json_schema", "json_schema": {"name": "cities", "schema": SCHEMA}}
    try:
        bodies = [{"model": real_worker.model, "max_tokens": 300, "temperature": 0.8, "seed": i,
                   "response_format": fmt,
                   "messages": [{"role": "user", "content": f"List six large cities as JSON ({i})."}]}
                  for i in range(STREAMS)]
        async with httpx.AsyncClient(base_url=front.url, timeout=300) as client:
            streams = [asyncio.create_task(stream_sse(client, "/v1/chat/completions", b)) for b in bodies]
            await asyncio.to_thread(wait_for, lambda: metric_value(
                victim.metrics_text(), "vllm:num_requests_running") >= 1, 120)
            # Tokens have reached the clients: the victim's streams are under way.
            await asyncio.to_thread(wait_for, lambda: metric_value(
                httpx.get(front.url + "/metrics").text, "infermesh_generation_tokens_total") >= 4 * STREAMS, 120)
            running = metric_value(victim.metrics_text(), "vllm:num_requests_running")
            victim.proc.kill()
            killed = time.monotonic()
            results = await asyncio.gather(*streams)
            took = time.monotonic() - killed
        retries = metric_value(httpx.get(front.url + "/metrics").text, "infermesh_frontend_worker_retries_total")
    finally:
        front.stop()
        sched.stop()
        victim.proc.stop()
    report("constrained-migration", streams=STREAMS, running_on_victim=int(running), resumed=int(retries),
           finished_after_kill_s=took)
    assert running >= 1 and retries >= 1
    for result in results:
        assert result.status == 200 and not result.errors, result.events[-2:]
        finish = [c["choices"][0]["finish_reason"] for c in result.chunks if c["choices"]][-1]
        assert finish == "stop", result.events[-3:]
        jsonschema.validate(json.loads(result.text()), SCHEMA)
