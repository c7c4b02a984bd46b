"""The KV block size workers report: recorded per model from their Info, listed in ListModels."""

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
