"""How a lease ended, as the worker reports it to its load watchers (`LoadReport.results`, for the schedulers'
canary analysis), and `ready_since`: the servicer in process over the simulated engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from infermesh.common.errors import InfermeshError
from infermesh.gpu_worker.service import WorkerService
from infermesh.gpu_worker.sim_engine import SimEngine, SimOptions
from infermesh.v1 import worker_pb2

from tests.gpu_worker.helpers import request
from tests.gpu_worker.test_deadlines import FakeContext, with_deadline

Outcome = worker_pb2.LeaseResult


async def started_service(**options: float) -> WorkerService:
    engine = SimEngine("chat@v2", None, SimOptions(**{"ttft_ms": 20, "itl_ms": 5, **options}))  # type: ignore[arg-type]
    await engine.start()
    service = WorkerService(engine, "w-1")
    service.engine_started()
    return service


async def consume(service: WorkerService, msg: worker_pb2.GenerateTokensRequest) -> tuple[int, InfermeshError | None]:
    """Tokens streamed and the error the call ended with."""
    tokens = 0
    try:
        async for reply in service.Generate(msg, FakeContext()):
            tokens += len(reply.token_ids)
    except InfermeshError as exc:
        return tokens, exc
    return tokens, None


class Watch:
    """A scheduler's WatchLoad stream on the servicer."""

    def __init__(self, service: WorkerService) -> None:
        self.stream: AsyncIterator[worker_pb2.LoadReport] = service.WatchLoad(
            worker_pb2.WatchLoadRequest(watcher="t", interval_ms=20), FakeContext())
        self.reports: list[worker_pb2.LoadReport] = []

    async def next(self) -> worker_pb2.LoadReport:
        report = await asyncio.wait_for(anext(self.stream), 2)
        self.reports.append(report)
        return report

    async def result_of(self, lease_id: str) -> worker_pb2.LeaseResult:
        """Reads reports until one ends the lease; its result (each report's results are its finished leases')."""
        while True:
            report = await self.next()
            assert {r.lease_id for r in report.results} <= set(report.leases_finished)
            found = [r for r in report.results if r.lease_id == lease_id]
            if found:
                return found[0]
            assert lease_id not in report.leases_finished, "the lease ended without a result"

    async def close(self) -> None:
        await self.stream.aclose()  # type: ignore[attr-defined]

    def results(self) -> list[str]:
        return [r.lease_id for report in self.reports for r in report.results]


@asynccontextmanager
async def watched(**options: float) -> AsyncIterator[tuple[WorkerService, Watch]]:
    """A started worker and one watcher of it, past the report at connection."""
    service = await started_service(**options)
    watch = Watch(service)
    try:
        await watch.next()
        yield service, watch
    finally:
        await watch.close()


async def test_a_finished_request_reports_ok_with_its_latencies() -> None:
    async with watched() as (service, watch):
        started = time.perf_counter()
        tokens, error = await consume(service, request([1, 2, 3], lease_id="lease-1", max_tokens=8))
        took = time.perf_counter() - started
        assert (tokens, error) == (8, None)
        result = await watch.result_of("lease-1")
        assert result.outcome == Outcome.OUTCOME_OK
        assert 0.018 <= result.ttft_s < took  # the simulated 20 ms to the first token
        assert 0.003 <= result.tpot_s <= 0.05  # about the 5 ms between tokens
        assert result.tpot_s * 7 <= took - result.ttft_s + 0.001


async def test_a_request_the_engine_fails_reports_failed_and_the_call_is_internal() -> None:
    async with watched(fail_rate=1.0) as (service, watch):
        tokens, error = await consume(service, request([1, 2, 3], lease_id="lease-f", max_tokens=8))
        assert tokens == 0 and error is not None and error.code.name == "INTERNAL"
        result = await watch.result_of("lease-f")
        assert (result.outcome, result.ttft_s, result.tpot_s) == (Outcome.OUTCOME_FAILED, 0.0, 0.0)
        assert service.engine.healthy() and not service.tracker.held  # the engine lives on


async def test_a_cancelled_call_reports_cancelled() -> None:
    async with watched(itl_ms=20) as (service, watch):
        call = asyncio.ensure_future(consume(service, request([1, 2, 3], lease_id="lease-c", max_tokens=200)))
        while not any(r.leases_started for r in watch.reports):
            await watch.next()
        await asyncio.sleep(0.06)  # the first tokens are out
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        result = await watch.result_of("lease-c")
        assert result.outcome == Outcome.OUTCOME_CANCELLED and result.ttft_s > 0


async def test_an_abort_reports_cancelled() -> None:
    async with watched(itl_ms=20) as (service, watch):
        msg = request([1, 2, 3], lease_id="lease-a", request_id="rid-a", max_tokens=200)
        call = asyncio.ensure_future(consume(service, msg))
        await asyncio.sleep(0.06)
        await service.Abort(worker_pb2.AbortRequest(request_id="rid-a"), FakeContext())
        tokens, error = await asyncio.wait_for(call, 2)
        assert error is None and 0 < tokens < 200
        assert (await watch.result_of("lease-a")).outcome == Outcome.OUTCOME_CANCELLED


async def test_a_deadline_passing_while_it_runs_reports_timeout() -> None:
    async with watched(itl_ms=20) as (service, watch):
        tokens, error = await consume(service, with_deadline(request([1, 2, 3], lease_id="lease-t", max_tokens=200),
                                                             0.15))
        assert error is not None and error.code.name == "DEADLINE_EXCEEDED" and tokens > 0
        assert (await watch.result_of("lease-t")).outcome == Outcome.OUTCOME_TIMEOUT


async def test_the_callers_deadline_cancelling_the_call_first_reports_timeout() -> None:
    # The caller's gRPC deadline is the request's: its cancellation may come a hair before the worker's timer.
    async with watched(itl_ms=20) as (service, watch):
        msg = with_deadline(request([1, 2, 3], lease_id="lease-g", max_tokens=200), 0.2)
        call = asyncio.ensure_future(consume(service, msg))
        await asyncio.sleep(0.15)  # within CANCEL_SLACK of the deadline
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)  # (on a slow machine the worker's timer may be first)
        assert (await watch.result_of("lease-g")).outcome == Outcome.OUTCOME_TIMEOUT


async def test_a_request_without_a_lease_reports_no_result() -> None:
    async with watched() as (service, watch):
        assert await consume(service, request([1, 2, 3], max_tokens=4)) == (4, None)
        assert await consume(service, request([1, 2, 3], lease_id="lease-2", max_tokens=4)) == (4, None)
        await watch.result_of("lease-2")
        assert watch.results() == ["lease-2"]


async def test_ready_since_is_set_once_the_engine_started() -> None:
    engine = SimEngine("chat@v2", None, SimOptions())
    service = WorkerService(engine, "w-1")
    assert service.report([], []).ready_since == 0.0
    await engine.start()
    before = time.time()
    service.engine_started()
    assert before <= service.report([], []).ready_since <= time.time()
    watch = Watch(service)
    assert (await watch.next()).ready_since == service.ready_since
    await watch.close()
