"""The embed task in the worker (its servicer over the simulated engine, in-process) and in the scheduler
(the task and vector length in the model cards; admission of a batch of inputs)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from infermesh.common.errors import DeadlineExceeded, InvalidRequest, Overloaded
from infermesh.gpu_worker.service import WorkerService
from infermesh.gpu_worker.sim_engine import SimEngine, SimOptions, sim_vector
from infermesh.scheduler.service import SchedulerService
from infermesh.v1 import common_pb2, scheduler_pb2, worker_pb2

from tests.scheduler.fakes import dispatcher

MODEL = "all-MiniLM-L6-v2"


class Context:
    """What the servicer reads of a gRPC context."""

    def add_done_callback(self, callback: Any) -> None:
        pass

    def time_remaining(self) -> float | None:
        return None


async def worker(model_dir: Path, **options: Any) -> WorkerService:
    engine = SimEngine(MODEL, model_dir, SimOptions(**{"task": "embed", "embed_ms": 0, **options}))
    await engine.start()
    service = WorkerService(engine, "w-1")
    service.engine_started()
    return service


def request(*inputs: list[int], lease: str = "", dimensions: int = 0,
            deadline: float | None = None) -> worker_pb2.EmbedTokensRequest:
    msg = worker_pb2.EmbedTokensRequest(model=MODEL, lease_id=lease, dimensions=dimensions,
                                        inputs=[common_pb2.TokenIds(ids=i) for i in inputs])
    msg.context.request_id = "r1"
    if deadline is not None:
        msg.context.deadline.FromNanoseconds(int(deadline * 1e9))
    return msg


async def test_an_embed_worker_reports_its_task_window_and_vector_length(minilm_dir: Path) -> None:
    service = await worker(minilm_dir)
    info = await service.Info(worker_pb2.InfoRequest(), Context())
    assert (info.task, info.embedding_dim, info.max_model_len, info.simulated) == ("embed", 384, 256, True)
    assert service.report([], []).embedding_dim == 384
    reply = await service.Embed(request([101, 7592, 102], [101, 2088, 999, 102]), Context())
    assert reply.prompt_tokens == 7
    assert [list(v.values) for v in reply.embeddings] == [
        pytest.approx(sim_vector([101, 7592, 102], 384), abs=1e-7),
        pytest.approx(sim_vector([101, 2088, 999, 102], 384), abs=1e-7)]


async def test_each_task_refuses_the_other_s_rpc(minilm_dir: Path, model_dir: Path) -> None:
    embedder = await worker(minilm_dir)
    with pytest.raises(InvalidRequest, match="serves embeddings only") as refused:
        async for _ in embedder.Generate(worker_pb2.GenerateTokensRequest(model=MODEL, prompt_ids=[101]),
                                         Context()):
            pass
    assert refused.value.param == "model"
    engine = SimEngine(model_dir.name, model_dir, SimOptions())
    await engine.start()
    generator = WorkerService(engine, "w-2")
    generator.engine_started()
    assert (await generator.Info(worker_pb2.InfoRequest(), Context())).task == "generate"
    with pytest.raises(InvalidRequest, match="chat and completions only"):
        await generator.Embed(worker_pb2.EmbedTokensRequest(inputs=[common_pb2.TokenIds(ids=[1])]), Context())


@pytest.mark.parametrize("inputs, dimensions, match", [
    ([], 0, "inputs must not be empty"),
    ([[101, 30522]], 0, "outside the vocabulary"),
    ([[101] * 257], 0, "maximum context length is 256"),
    ([[101, 102]], 128, "Matryoshka"),
])
async def test_the_worker_checks_the_edge_s_rules_again(minilm_dir: Path, inputs: list[list[int]],
                                                        dimensions: int, match: str) -> None:
    service = await worker(minilm_dir)
    with pytest.raises(InvalidRequest, match=match):
        await service.Embed(request(*inputs, dimensions=dimensions), Context())
    assert not service.tracker.held


async def test_a_full_worker_refuses_and_a_deadline_aborts_the_batch(minilm_dir: Path) -> None:
    service = await worker(minilm_dir, max_num_seqs=1, embed_ms=5000)
    first = asyncio.ensure_future(service.Embed(request([101, 102], lease="L1"), Context()))
    while not service.tracker.held:
        await asyncio.sleep(0.001)
    assert service.tracker.leases_active() == ["L1"]
    with pytest.raises(Overloaded, match="at capacity"):
        await service.Embed(request([101, 102], lease="L2"), Context())
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert not service.tracker.held  # the cancelled call's lease ended at once
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="while it was embedding"):
        await service.Embed(request([101, 102], deadline=time.time() + 0.2), Context())
    assert time.monotonic() - started < 2 and not service.tracker.held


def embed_info(**fields: Any) -> worker_pb2.WorkerInfo:
    return worker_pb2.WorkerInfo(**{"worker_id": "w-e", "model": MODEL, "max_model_len": 256, "engine": "vllm",
                                    "max_num_seqs": 2, "kv_capacity_tokens": 300_000, "task": "embed", **fields})


def report(seq: int, **fields: Any) -> worker_pb2.LoadReport:
    return worker_pb2.LoadReport(**{"worker_id": "w-e", "model": MODEL, "seq": seq, "max_num_seqs": 2,
                                    "kv_capacity_tokens": 300_000, "max_model_len": 256, **fields})


async def test_the_scheduler_lists_the_task_and_admits_a_batch_longer_than_the_window() -> None:
    d = dispatcher()
    d.on_info("e:1", embed_info())  # its engine still starting: no vector length yet
    d.on_report("e:1", report(1, embedding_dim=384))
    d.on_info("g:1", worker_pb2.WorkerInfo(worker_id="w-g", model="gen", max_model_len=2048, max_num_seqs=4,
                                           kv_capacity_tokens=10_000))
    d.on_report("g:1", worker_pb2.LoadReport(worker_id="w-g", model="gen", seq=1, max_num_seqs=4,
                                             kv_capacity_tokens=10_000, max_model_len=2048))
    service = SchedulerService(d)
    cards = {c.id: c for c in (await service.ListModels(common_pb2.ListModelsRequest(), None)).models}
    assert (cards[MODEL].task, cards[MODEL].embedding_dim, cards[MODEL].max_model_len) == ("embed", 384, 256)
    assert (cards["gen"].task, cards["gen"].embedding_dim) == ("generate", 0)
    # 40 inputs of 200 tokens: 8000 tokens together, far past the 256-token window of one sequence.
    lease = await service.Admit(scheduler_pb2.AdmitRequest(model=MODEL, prompt_tokens=8000), None)
    assert lease.worker_address == "e:1"
    assert d.workers["e:1"].pending[lease.lease_id] == (8000, 1)  # one request slot, its input tokens
    with pytest.raises(InvalidRequest, match="serves embeddings only") as refused:
        await service.Admit(scheduler_pb2.AdmitRequest(model=MODEL, prompt_tokens=10, max_tokens=16), None)
    assert refused.value.param == "model"
    with pytest.raises(InvalidRequest, match="exceed what any worker") as refused:
        await service.Admit(scheduler_pb2.AdmitRequest(model=MODEL, prompt_tokens=300_001), None)
    assert refused.value.param == "input"
