"""The caller's deadline on the worker: the timer, the servicer in process, a simulated worker over gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from infermesh.common.context import deadline_of, seconds_left
from infermesh.common.errors import DeadlineExceeded, InvalidRequest
from infermesh.gpu_worker import metrics
from infermesh.gpu_worker.deadlines import DeadlineTimer
from infermesh.gpu_worker.engine import Delta, Engine, EngineInfo, EngineLoad, GenerateRequest
from infermesh.gpu_worker.service import WorkerService
from infermesh.v1 import common_pb2, worker_pb2

from tests.gpu_worker.helpers import eventually, metric, metrics_text, request, stub


def at(unix: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix * 1e9))
    return ts


def with_deadline(msg: worker_pb2.GenerateTokensRequest, left: float) -> worker_pb2.GenerateTokensRequest:
    msg.context.deadline.CopyFrom(at(time.time() + left))
    return msg


def expired_count(text: str) -> float:
    try:
        return metric(text, "infermesh_worker_deadline_exceeded_total")
    except AssertionError:
        return 0.0  # not exported before its first increment


# ---- the timer ----------------------------------------------------------------------------------

def test_seconds_left_reads_the_wall_clock() -> None:
    ctx = common_pb2.RequestContext()
    ctx.deadline.CopyFrom(at(1000.5))
    deadline = deadline_of(ctx)
    assert deadline is not None and seconds_left(deadline, now=1000.0) == pytest.approx(0.5)
    assert deadline_of(common_pb2.RequestContext()) is None


def test_a_deadline_that_is_no_valid_time_is_the_callers_mistake() -> None:
    ctx = common_pb2.RequestContext()
    ctx.deadline.nanos = -2 ** 31  # what a fuzzer sent; protobuf refuses to read it as a time
    with pytest.raises(InvalidRequest, match="not a valid time"):
        deadline_of(ctx)


def test_seconds_left_goes_negative_once_passed() -> None:
    assert seconds_left(1000.0, now=1000.25) == pytest.approx(-0.25)
    assert 9 < seconds_left(time.time() + 10) <= 10


async def test_the_timer_fires_once_at_the_deadline_and_not_after_cancel() -> None:
    fired: list[float] = []
    started = time.monotonic()
    timer = DeadlineTimer(0.05, lambda: fired.append(time.monotonic() - started), None)
    kept = DeadlineTimer(0.05, lambda: fired.append(-1.0), None)
    kept.cancel()
    assert not timer.expired
    await asyncio.sleep(0.15)
    assert timer.expired and not kept.expired and len(fired) == 1 and 0.04 < fired[0] < 0.14
    timer.cancel()


async def test_the_timer_cancels_the_task_when_the_abort_does_not_end_it() -> None:
    async def stuck() -> None:
        await asyncio.sleep(10)

    task = asyncio.create_task(stuck())
    timer = DeadlineTimer(0.02, lambda: None, task, grace=0.05)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    assert timer.expired and timer.forced


# ---- the servicer in process, on engines that end an aborted stream or ignore the abort --------

class SlowEngine(Engine):
    """One token every 20 ms for ever; `honour_abort=False` ignores aborts (a stream that will not end)."""

    def __init__(self, honour_abort: bool = True) -> None:
        self.info = EngineInfo(engine="fake", model="fake-model", max_model_len=10_000, vocab_size=100,
                               max_num_seqs=4, kv_capacity_tokens=100_000, block_size=16)
        self.honour_abort = honour_abort
        self.aborted: set[str] = set()
        self.running: set[str] = set()

    async def start(self) -> None:
        return None

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Delta, None]:
        self.running.add(request.request_id)
        try:
            for _ in range(request.max_tokens):
                await asyncio.sleep(0.02)
                if request.request_id in self.aborted:
                    yield Delta(index=0, token_ids=[], finish_reason="abort")
                    return
                yield Delta(index=0, token_ids=[1])
            yield Delta(index=0, token_ids=[], finish_reason="length")
        finally:
            self.running.discard(request.request_id)

    async def abort(self, request_id: str) -> bool:
        if self.honour_abort:
            self.aborted.add(request_id)
        return request_id in self.running

    def load(self) -> EngineLoad:
        return EngineLoad(running=len(self.running))

    def healthy(self) -> bool:
        return True


class FakeContext:
    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def add_done_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)


async def run(service: WorkerService, msg: worker_pb2.GenerateTokensRequest) -> tuple[int, BaseException | None]:
    """Tokens streamed and the error the stream ended with, consumed in a task of its own."""
    async def consume() -> tuple[int, BaseException | None]:
        tokens = 0
        try:
            async for reply in service.Generate(msg, FakeContext()):
                assert reply.finish_reason != "abort", "the deadline's abort is not streamed"
                tokens += len(reply.token_ids)
        except DeadlineExceeded as exc:
            return tokens, exc
        return tokens, None
    return await asyncio.wait_for(asyncio.create_task(consume()), 5)


def service_on(engine: SlowEngine) -> WorkerService:
    service = WorkerService(engine, "w-1")
    service.engine_started()
    return service


def counted() -> float:
    return metrics.DEADLINE_EXCEEDED.labels(model_name="fake-model")._value.get()


@pytest.mark.parametrize("honour_abort", [True, False], ids=["engine-aborts", "engine-ignores-abort"])
async def test_a_deadline_passing_mid_stream_aborts_and_ends_the_call(honour_abort: bool) -> None:
    engine = SlowEngine(honour_abort)
    service = service_on(engine)
    before = counted()
    started = time.monotonic()
    tokens, error = await run(service, with_deadline(request([1, 2, 3], max_tokens=500), 0.2))
    took = time.monotonic() - started
    assert isinstance(error, DeadlineExceeded) and "while it was generating" in error.message
    assert tokens >= 3  # tokens streamed until the deadline
    assert 0.18 < took < (0.5 if honour_abort else 1.0)  # at the deadline, or after the abort's grace
    assert not engine.running and not service.tracker.held  # the engine stopped; the capacity is free
    assert counted() == before + 1


async def test_a_deadline_that_does_not_pass_changes_nothing() -> None:
    engine = SlowEngine()
    service = service_on(engine)
    before = counted()
    tokens, error = await run(service, with_deadline(request([1, 2, 3], max_tokens=5), 5.0))
    assert (tokens, error) == (5, None) and counted() == before and not engine.aborted


async def test_a_deadline_already_past_is_refused_before_the_engine_sees_it() -> None:
    engine = SlowEngine()
    service = service_on(engine)
    before = counted()
    tokens, error = await run(service, with_deadline(request([1, 2, 3], max_tokens=5), -0.01))
    assert tokens == 0 and isinstance(error, DeadlineExceeded) and "before it reached the worker" in error.message
    assert counted() == before + 1 and not engine.running and not service.tracker.held


# ---- a simulated worker over gRPC ---------------------------------------------------------------

async def test_sim_worker_aborts_a_request_when_its_deadline_passes(sim_worker_factory) -> None:
    proc = sim_worker_factory(sim_ttft_ms=20, sim_itl_ms=50)
    channel, worker = stub(proc.address)
    async with channel:
        await worker.Info(worker_pb2.InfoRequest())  # connected
        before = expired_count(metrics_text(proc.metrics_port))
        tokens = 0
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for msg in worker.Generate(with_deadline(request([1, 2, 3], max_tokens=200), 0.3)):
                assert msg.finish_reason != "abort"
                tokens += len(msg.token_ids)
        took = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        assert 0.25 < took < 1.0 and 2 <= tokens < 20
        assert await eventually(lambda: metric(metrics_text(proc.metrics_port), "vllm:num_requests_running")
                                == 0, 2.0)
        report = await worker.WatchLoad(worker_pb2.WatchLoadRequest(watcher="t")).read()
        assert report.running == 0 and report.committed_tokens == 0
        assert expired_count(metrics_text(proc.metrics_port)) == before + 1


async def test_sim_worker_refuses_a_deadline_already_past(sim_worker_factory) -> None:
    proc = sim_worker_factory(sim_itl_ms=50)
    channel, worker = stub(proc.address)
    async with channel:
        await worker.Info(worker_pb2.InfoRequest())
        before = expired_count(metrics_text(proc.metrics_port))
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in worker.Generate(with_deadline(request([1, 2, 3], max_tokens=200), -1.0)):
                pytest.fail("a refused request streams nothing")
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 0.5
        text = metrics_text(proc.metrics_port)
        assert expired_count(text) == before + 1
        assert metric(text, "vllm:num_requests_running") == 0
