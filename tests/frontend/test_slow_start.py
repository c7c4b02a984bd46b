"""A mesh whose worker is still loading when the scheduler connects (what `infermesh up` does).

vLLM answers Info while its engine loads, with no context window or block size
yet; the scheduler must learn them from the worker's later load reports, or the
frontend has no window to check requests against. The simulated engine's
`--sim-start-ms` starts the same way.
"""

from __future__ import annotations

import httpx

from tests.fixtures.mesh import start_frontend, start_scheduler
from tests.fixtures.worker import start_sim_worker


def test_requests_are_served_once_a_slowly_starting_worker_is_ready(model_dir, tokenizer_proc, tmp_path) -> None:
    worker = start_sim_worker(tmp_path, model_dir, wait=False, sim_start_ms=1500, sim_ttft_ms=0, sim_itl_ms=0)
    procs = [worker]
    try:
        # The scheduler connects while the engine loads: the worker's Info says nothing of its window.
        procs.append(sched := start_scheduler(tmp_path, [worker.address]))
        procs.append(front := start_frontend(tmp_path, tokenizer_proc.address, sched.address))
        front.wait_ready()
        reply = httpx.post(front.url + "/v1/completions", timeout=30,
                           json={"model": model_dir.name, "prompt": "Paris is", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        models = httpx.get(front.url + "/v1/models", timeout=10).json()["data"]
        assert models[0]["max_model_len"] > 0
    finally:
        for proc in reversed(procs):
            proc.stop()
