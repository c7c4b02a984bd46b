"""Embeddings through a mesh of simulated embed workers (real processes): the admission queue's 429, a
worker lost mid-batch, and the catalog's names."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.frontend.sse import metric_value, scrape, wait_for
from tests.harness import free_port

INPUTS = ["A cat sits on the mat.", "Quarterly revenue rose by 4%."]


async def test_a_full_queue_is_429_with_retry_after_and_the_queued_request_is_served(
        sim_embed_mesh_factory) -> None:
    scheduler_metrics = free_port()
    mesh = sim_embed_mesh_factory(workers=1, max_num_seqs=1, sim_embed_ms=2000,
                                  scheduler={"max_queue": 1, "metrics_port": scheduler_metrics})
    body = {"model": mesh.model, "input": INPUTS}
    worker_port = mesh.workers[0].metrics_port
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        first = asyncio.create_task(client.post("/v1/embeddings", json=body))
        await asyncio.to_thread(wait_for, lambda: metric_value(scrape(worker_port), "vllm:num_requests_running")
                                >= 1, 10)
        queued = asyncio.create_task(client.post("/v1/embeddings", json=body))
        await asyncio.to_thread(wait_for, lambda: metric_value(scrape(scheduler_metrics),
                                                               "infermesh_scheduler_queue_depth") >= 1, 10)
        refused = await client.post("/v1/embeddings", json=body)
        served = await asyncio.gather(first, queued)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "overloaded"
    for reply in served:
        assert reply.status_code == 200, reply.text
        assert [d["index"] for d in reply.json()["data"]] == [0, 1]
        assert len(reply.json()["data"][0]["embedding"]) == 384
    assert served[0].json() == served[1].json()
    assert metric_value(scrape(scheduler_metrics), 'infermesh_scheduler_rejected_total{reason="queue_full"}') >= 1


async def test_a_worker_killed_mid_batch_is_replaced_and_every_request_gets_its_vectors(
        sim_embed_mesh_factory) -> None:
    mesh = sim_embed_mesh_factory(workers=2, sim_embed_ms=1500, scheduler={"policy": "least_load"})
    # Four priorities: requests sent together are coalesced per tenant and priority, so at least four
    # batches, which least-load spreads over both workers.
    priorities = ["critical", "high", "normal", "low"]
    bodies = [{"model": mesh.model, "input": [f"sentence number {i}", f"and another, {i}"],
               "priority": priorities[i % 4]} for i in range(8)]
    victim = mesh.workers[0]
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        calls = [asyncio.create_task(client.post("/v1/embeddings", json=b)) for b in bodies]
        await asyncio.to_thread(wait_for, lambda: metric_value(scrape(victim.metrics_port),
                                                               "vllm:num_requests_running") >= 2, 10)
        victim.kill()
        replies = await asyncio.gather(*calls)
        # The survivor alone, again: the same vectors (they depend on the inputs only, not on the worker).
        references = await asyncio.gather(*(client.post("/v1/embeddings", json=b) for b in bodies))
    for reply, reference in zip(replies, references, strict=True):
        assert reply.status_code == 200, reply.text
        assert reply.json() == reference.json()
    retried = metric_value(httpx.get(mesh.url + "/metrics").text, "infermesh_frontend_worker_retries_total")
    assert retried >= 2


async def test_the_catalog_s_alias_names_the_embed_model_and_a_chat_model_is_refused(
        sim_embed_mesh_factory, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("""format: 1
models:
  - name: SmolLM2-135M-Instruct
    weights: {prepared: SmolLM2-135M-Instruct}
    aliases: [chat-small]
  - name: all-MiniLM-L6-v2
    task: embed
    weights: {prepared: all-MiniLM-L6-v2}
    aliases: [minilm]
""")
    mesh = sim_embed_mesh_factory(workers=1, frontend={"catalog": str(catalog)})
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as client:
        by_alias = await client.post("/v1/embeddings", json={"model": "minilm", "input": INPUTS})
        by_name = await client.post("/v1/embeddings", json={"model": mesh.model, "input": INPUTS})
        chat = await client.post("/v1/embeddings", json={"model": "chat-small", "input": INPUTS})
        unknown = await client.post("/v1/embeddings", json={"model": "nope", "input": INPUTS})
    assert by_alias.status_code == 200, by_alias.text
    assert by_alias.json()["model"] == "all-MiniLM-L6-v2"
    assert by_alias.json()["data"] == by_name.json()["data"]
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "model"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
