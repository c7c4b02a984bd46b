"""The KV block size and context window workers report: recorded per model from their Info and load reports,
listed in ListModels."""

from __future__ import annotations

import logging

import pytest
from infermesh.scheduler.service import SchedulerService
from infermesh.v1 import common_pb2

from tests.scheduler.fakes import FakeWorker, dispatcher


async def test_list_models_reports_the_workers_block_size() -> None:
    d = dispatcher()
    FakeWorker(d, "a:1", block_size=32)
    FakeWorker(d, "b:1", model="other")  # the fakes' default, 16
    reply = await SchedulerService(d).ListModels(common_pb2.ListModelsRequest(), None)
    assert {c.id: c.block_size for c in reply.models} == {"m": 32, "other": 16}


def test_disagreeing_workers_keep_the_first_block_size_and_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    d = dispatcher()
    FakeWorker(d, "a:1", block_size=16)
    with caplog.at_level(logging.WARNING, logger="infermesh.scheduler.dispatcher"):
        FakeWorker(d, "b:1", block_size=32)
        FakeWorker(d, "c:1", block_size=32)
        FakeWorker(d, "d:1", block_size=16)
    assert d.models["m"].block_size == 16
    warnings = [r for r in caplog.records if "block size" in r.getMessage()]
    assert len(warnings) == 1 and "32" in warnings[0].getMessage()


def test_a_worker_reporting_no_block_size_leaves_it_unset() -> None:
    d = dispatcher()
    FakeWorker(d, "a:1", block_size=0)  # e.g. an engine still loading
    assert d.models["m"].block_size == 0  # the frontend falls back to DEFAULT_BLOCK_SIZE
    FakeWorker(d, "b:1", block_size=32)
    assert d.models["m"].block_size == 32


async def test_a_worker_whose_engine_was_still_starting_at_info_time_is_learned_from_its_reports() -> None:
    # A vLLM worker answers Info while its engine loads (window and block size 0); `infermesh up` starts
    # the scheduler before the engines are ready. The model's card must follow the later reports.
    from infermesh.v1 import worker_pb2

    d = dispatcher()
    d.on_info("a:1", worker_pb2.WorkerInfo(worker_id="w-a", model="m", engine="vllm"))
    d.on_report("a:1", worker_pb2.LoadReport(worker_id="w-a", model="m", seq=1))
    service = SchedulerService(d)
    # Still starting (no capacity reported): not ready, so its model is not listed as served yet.
    assert d.workers["a:1"].state.name == "CONNECTING"
    assert list((await service.ListModels(common_pb2.ListModelsRequest(), None)).models) == []
    d.on_report("a:1", worker_pb2.LoadReport(worker_id="w-a", model="m", seq=2, max_model_len=8192, block_size=128,
                                             max_num_seqs=64, kv_capacity_tokens=100_000))
    assert d.workers["a:1"].state.name == "READY"
    card = (await service.ListModels(common_pb2.ListModelsRequest(), None)).models[0]
    assert (card.max_model_len, card.block_size) == (8192, 128)
