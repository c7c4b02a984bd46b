"""Admission under a TTFT SLO, in process: the queue's budget, the forecast refusal, the rate behind it."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from infermesh.common.errors import Overloaded, QueueTimeout
from infermesh.scheduler import metrics
from infermesh.scheduler.admission import FairQueue, ServiceRate, Ticket
from infermesh.scheduler.dispatcher import Limits
from infermesh.scheduler.main import SchedulerConfig
from infermesh.v1 import common_pb2

from tests.scheduler.fakes import Clock, FakeWorker, dispatcher


def ticket(tenant: str = "", priority: int = common_pb2.PRIORITY_NORMAL) -> Ticket:
    return Ticket(model="m", tokens=100, tenant=tenant, priority=priority)


def refused(reason: str) -> float:
    return metrics.REJECTED.labels(reason)._value.get()


async def until(predicate, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def test_budget_is_the_slo_share_and_never_past_the_queue_timeout() -> None:
    assert Limits().budget() is None
    assert Limits(ttft_slo=2.0).budget() == 1.0
    assert Limits(ttft_slo=2.0, slo_queue_share=0.75).budget() == 1.5
    assert Limits(queue_timeout=0.4, ttft_slo=2.0).budget() == 0.4


def test_options_are_validated() -> None:
    assert not SchedulerConfig(workers=["a:1"], ttft_slo=2.0).validate()
    assert any("ttft_slo must be >= 0" in p for p in SchedulerConfig(workers=["a:1"], ttft_slo=-1).validate())
    for share in (0.0, 1.5, -0.2):
        problems = SchedulerConfig(workers=["a:1"], ttft_slo=2, ttft_slo_queue_share=share).validate()
        assert any("ttft_slo_queue_share" in p for p in problems)


def test_service_rate_counts_busy_time_only_and_needs_history() -> None:
    r = ServiceRate(tau=5.0, min_samples=4)
    assert r.rate(0.0) is None
    r.busy(0.0, True)
    for i in range(1, 4):
        r.record(i * 0.25)
    assert r.rate(0.75) is None  # 3 departures: not enough to judge
    r.record(1.0)
    assert r.rate(1.0) == pytest.approx(4.0, rel=0.05)
    r.busy(1.0, False)
    assert r.rate(1000.0) == pytest.approx(4.0, rel=0.05)  # idle time neither dilutes nor ages it
    r.busy(1000.0, True)
    for i in range(1, 41):  # the queue now moves at 2/s
        r.record(1000.0 + i * 0.5)
    assert r.rate(1020.0) == pytest.approx(2.0, rel=0.1)
    # A queue that stops moving: the estimate decays towards 0.
    assert r.rate(1040.0) < 0.1 * r.rate(1020.0)


def test_service_rate_is_a_normalised_exponential_average() -> None:
    r = ServiceRate(tau=2.0, min_samples=1)
    r.busy(0.0, True)
    for i in range(1, 101):
        r.record(i * 0.1)
    assert r.rate(10.0) == pytest.approx(10.0, rel=0.05)
    assert math.isfinite(r.rate(10.0))


def test_ahead_counts_priority_and_the_tenants_turns() -> None:
    q = FairQueue({"heavy": 1, "big": 2})
    for _ in range(6):
        q.push(ticket("bulk"))
    assert q.ahead("bulk", common_pb2.PRIORITY_NORMAL) == 6
    assert q.ahead("new", common_pb2.PRIORITY_NORMAL) == 1  # one turn of bulk's, then its own
    assert q.ahead("big", common_pb2.PRIORITY_NORMAL) == 1
    assert q.ahead("x", common_pb2.PRIORITY_HIGH) == 0
    assert q.ahead("x", common_pb2.PRIORITY_LOW) == 6
    q.push(ticket("x", common_pb2.PRIORITY_CRITICAL))
    assert q.ahead("new", common_pb2.PRIORITY_NORMAL) == 2
    first = ticket("bulk")
    q.push(first)
    q.discard(first)  # gave up: no longer counted
    assert q.ahead("bulk", common_pb2.PRIORITY_NORMAL) == 7
    q.drain()
    assert q.ahead("bulk", common_pb2.PRIORITY_NORMAL) == 0


async def make_history(d, w: FakeWorker, clock: Clock, departures: int, every: float) -> object:
    """One lease held; `departures` queued tickets, each granted `every` s (fake clock) after the last."""
    lease = (await d.admit(ticket())).lease
    for _ in range(departures):
        waiter = asyncio.create_task(d.admit(ticket()))
        await until(lambda: len(d.models["m"].queue) == 1)
        clock.now += every
        d.release(lease.lease_id)
        lease = (await waiter).lease
    return lease


async def test_no_refusal_when_idle_or_without_history() -> None:
    clock = Clock()
    d = dispatcher(clock=clock, ttft_slo=1.0)
    FakeWorker(d, "a:1", max_num_seqs=4)
    leases = [(await d.admit(ticket())).lease for _ in range(4)]  # room: granted at once
    assert len(leases) == 4
    before = refused("slo_forecast")
    waiters = [asyncio.create_task(d.admit(ticket())) for _ in range(20)]  # no rate known: all wait
    await until(lambda: len(d.models["m"].queue) == 20)
    assert refused("slo_forecast") == before
    for lease in leases:
        d.release(lease.lease_id)
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_a_wait_past_the_budget_is_refused_as_overloaded() -> None:
    d = dispatcher(ttft_slo=0.2, queue_timeout=30)
    FakeWorker(d, "a:1", max_num_seqs=1)
    await d.admit(ticket())
    before = refused("slo_budget")
    started = time.monotonic()
    with pytest.raises(QueueTimeout, match="TTFT SLO") as info:
        await d.admit(ticket())
    assert 0.09 < time.monotonic() - started < 0.6  # the budget is 0.1 s (half of 0.2)
    assert info.value.retry_after is not None and info.value.retry_after > 0
    assert refused("slo_budget") == before + 1
    assert len(d.models["m"].queue) == 0
    # A queue timeout shorter than the budget stays the queue timeout.
    d2 = dispatcher(ttft_slo=10, queue_timeout=0.05)
    FakeWorker(d2, "a:1", max_num_seqs=1)
    await d2.admit(ticket())
    with pytest.raises(QueueTimeout, match="queue timeout") as timed_out:
        await d2.admit(ticket())
    assert timed_out.value.retry_after is not None


async def test_an_expected_wait_past_the_budget_is_refused_at_once() -> None:
    clock = Clock()
    d = dispatcher(clock=clock, ttft_slo=1.0, queue_timeout=30)  # budget 0.5 s
    w = FakeWorker(d, "a:1", max_num_seqs=1)
    lease = await make_history(d, w, clock, departures=10, every=0.1)  # the queue moves at 10/s
    rate = d.models["m"].service.rate(clock())
    assert rate == pytest.approx(10.0, rel=0.1)
    waiters = [asyncio.create_task(d.admit(ticket())) for _ in range(5)]
    await until(lambda: len(d.models["m"].queue) == 5)  # the 5th in line expects 0.5 s: within the budget
    before = refused("slo_forecast")
    started = time.monotonic()
    with pytest.raises(Overloaded, match="expected wait") as info:
        await d.admit(ticket())  # the 6th would expect 0.6 s: refused without waiting
    assert time.monotonic() - started < 0.05
    assert info.value.retry_after == pytest.approx(0.6 - 0.5, abs=0.02)
    assert refused("slo_forecast") == before + 1
    # Another priority or tenant is placed by its own turn, not the whole queue's length.
    urgent = asyncio.create_task(d.admit(ticket("ops", common_pb2.PRIORITY_HIGH)))
    await until(lambda: len(d.models["m"].queue) == 6)
    d.release(lease.lease_id)
    assert (await asyncio.wait_for(urgent, 1)).lease.address == "a:1"
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
