"""Admission end to end without gRPC: waiting, bounds, timeouts, deadlines, errors, expiry."""

from __future__ import annotations

import asyncio
import time

import pytest
from infermesh.common.errors import DeadlineExceeded, InvalidRequest, NotFound, Overloaded, QueueTimeout, Unavailable
from infermesh.scheduler import metrics
from infermesh.scheduler.admission import Ticket
from infermesh.v1 import common_pb2

from tests.scheduler.fakes import Clock, FakeWorker, dispatcher


def ticket(tokens: int = 100, tenant: str = "", priority: int = 0, model: str = "m", **kw) -> Ticket:
    return Ticket(model=model, tokens=tokens, tenant=tenant, priority=priority, **kw)


async def until(predicate, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def test_grants_at_once_when_a_worker_has_room() -> None:
    d = dispatcher()
    FakeWorker(d, "a:1")
    grant = await d.admit(ticket())
    assert grant.queue_seconds == 0.0 and grant.lease.address == "a:1" and grant.lease.worker_id == "w-a:1"


async def test_waits_until_capacity_frees_then_grants() -> None:
    d = dispatcher()
    w = FakeWorker(d, "a:1", max_num_seqs=1)
    first = await d.admit(ticket())
    waiter = asyncio.create_task(d.admit(ticket()))
    await until(lambda: len(d.models["m"].queue) == 1)
    assert not waiter.done()
    w.start(first.lease.lease_id, 100)
    w.report()
    assert not waiter.done()  # still running: no room
    w.finish(first.lease.lease_id)
    w.report()
    grant = await asyncio.wait_for(waiter, 1)
    assert grant.lease.address == "a:1" and len(d.models["m"].queue) == 0


async def test_a_full_queue_refuses_at_once_with_a_retry_hint() -> None:
    d = dispatcher(max_queue=2)
    FakeWorker(d, "a:1", max_num_seqs=1)
    await d.admit(ticket())
    waiters = [asyncio.create_task(d.admit(ticket())) for _ in range(2)]
    await until(lambda: len(d.models["m"].queue) == 2)
    with pytest.raises(Overloaded) as info:
        await d.admit(ticket())
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 30
    assert "full" in info.value.message
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert len(d.models["m"].queue) == 0  # cancelled waiters left the queue


async def test_retry_hint_reflects_the_observed_drain_rate() -> None:
    clock = Clock()
    d = dispatcher(clock=clock, max_queue=4)
    w = FakeWorker(d, "a:1", max_num_seqs=1)
    lease = (await d.admit(ticket())).lease
    for _ in range(8):  # one departure from the queue every 0.5 s
        waiter = asyncio.create_task(d.admit(ticket()))
        await until(lambda: len(d.models["m"].queue) == 1)
        clock.now += 0.5
        d.release(lease.lease_id)
        lease = (await waiter).lease
    waiters = [asyncio.create_task(d.admit(ticket())) for _ in range(4)]
    await until(lambda: len(d.models["m"].queue) == 4)
    with pytest.raises(Overloaded) as info:
        await d.admit(ticket())
    assert info.value.retry_after == pytest.approx(4 * 0.5, rel=0.05)  # 4 waiting at 2 per second
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert w.address == "a:1"


def rejected(reason: str) -> float:
    return metrics.REJECTED.labels(reason)._value.get()


async def test_queue_timeout_is_overload_with_a_retry_hint() -> None:
    clock = Clock()
    d = dispatcher(clock=clock, queue_timeout=0.3)
    w = FakeWorker(d, "a:1", max_num_seqs=1)
    lease = (await d.admit(ticket())).lease
    for _ in range(4):  # a history: one departure from the queue every 0.25 s
        waiter = asyncio.create_task(d.admit(ticket()))
        await until(lambda: len(d.models["m"].queue) == 1)
        clock.now += 0.25
        d.release(lease.lease_id)
        lease = (await waiter).lease
    assert w.address == "a:1"
    before = rejected("timeout"), rejected("deadline")
    started = time.monotonic()
    with pytest.raises(QueueTimeout, match="queue timeout") as info:
        await d.admit(ticket())
    assert 0.25 < time.monotonic() - started < 1.5
    assert isinstance(info.value, Overloaded) and info.value.code.name == "RESOURCE_EXHAUSTED"
    assert info.value.retry_after == pytest.approx(0.25, rel=0.05)  # its own place (1) at 4 per second
    assert (rejected("timeout"), rejected("deadline")) == (before[0] + 1, before[1])
    assert len(d.models["m"].queue) == 0


async def test_queue_timeout_without_history_still_hints() -> None:
    d = dispatcher(queue_timeout=0.05)
    FakeWorker(d, "a:1", max_num_seqs=1)
    await d.admit(ticket())
    with pytest.raises(QueueTimeout) as info:
        await d.admit(ticket())
    assert info.value.retry_after == pytest.approx(0.05)  # the default hint, capped by the queue timeout


async def test_caller_deadline_is_honoured() -> None:
    d = dispatcher(queue_timeout=30)
    FakeWorker(d, "a:1", max_num_seqs=1)
    await d.admit(ticket())
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="deadline"):
        await d.admit(ticket(), timeout=0.05)
    assert time.monotonic() - started < 1.0
    with pytest.raises(DeadlineExceeded):
        await d.admit(ticket(), timeout=-1)  # already past
    d2 = dispatcher()
    FakeWorker(d2, "a:1")
    with pytest.raises(DeadlineExceeded):
        await d2.admit(ticket(), timeout=-0.1)  # past deadlines are refused even with room


async def test_a_queued_ticket_whose_deadline_passes_leaves_the_queue() -> None:
    d = dispatcher(queue_timeout=30)
    FakeWorker(d, "a:1", max_num_seqs=1)
    await d.admit(ticket())
    patient = asyncio.create_task(d.admit(ticket(tenant="patient")))
    await until(lambda: len(d.models["m"].queue) == 1)
    before = rejected("deadline"), rejected("timeout")
    hurried = asyncio.create_task(d.admit(ticket(tenant="hurried"), timeout=0.1))
    await until(lambda: len(d.models["m"].queue) == 2)
    with pytest.raises(DeadlineExceeded, match="deadline passed after"):
        await asyncio.wait_for(hurried, 1)
    assert len(d.models["m"].queue) == 1 and not patient.done()  # only the ticket past its deadline left
    assert (rejected("deadline"), rejected("timeout")) == (before[0] + 1, before[1])
    patient.cancel()
    await asyncio.gather(patient, return_exceptions=True)
    assert len(d.models["m"].queue) == 0


async def test_a_deadline_past_on_arrival_is_refused_at_once() -> None:
    d = dispatcher(queue_timeout=30)
    FakeWorker(d, "a:1", max_num_seqs=1)
    await d.admit(ticket())
    before = rejected("deadline")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="before it reached"):
        await d.admit(ticket(), timeout=0.0)
    assert time.monotonic() - started < 0.05
    assert rejected("deadline") == before + 1 and len(d.models["m"].queue) == 0


async def test_clear_errors_for_unknown_models_missing_workers_and_huge_requests() -> None:
    d = dispatcher()
    FakeWorker(d, "a:1", kv_capacity_tokens=1000, max_model_len=800)
    with pytest.raises(NotFound, match="not served"):
        await d.admit(ticket(model="nope"))
    with pytest.raises(InvalidRequest, match="model is required"):
        await d.admit(ticket(model=""))
    with pytest.raises(InvalidRequest, match="exceeds"):
        await d.admit(ticket(tokens=900))
    with pytest.raises(Unavailable, match="excluded"):
        await d.admit(ticket(exclude=frozenset({"w-a:1"})))
    d.on_lost("a:1", "test")
    with pytest.raises(Unavailable, match="no worker"):
        await d.admit(ticket())


async def test_waiters_fail_fast_when_the_last_worker_goes() -> None:
    d = dispatcher()
    FakeWorker(d, "a:1", max_num_seqs=1)
    await d.admit(ticket())
    waiter = asyncio.create_task(d.admit(ticket()))
    await until(lambda: len(d.models["m"].queue) == 1)
    d.on_lost("a:1", "test")
    with pytest.raises(Unavailable):
        await asyncio.wait_for(waiter, 1)


async def test_priority_and_fairness_decide_who_gets_freed_capacity() -> None:
    d = dispatcher()
    w = FakeWorker(d, "a:1", max_num_seqs=1)
    lease = (await d.admit(ticket())).lease
    order: list[str] = []

    async def wait(tag: str, **kw) -> None:
        grant = await d.admit(ticket(**kw))
        order.append(tag)
        d.release(grant.lease.lease_id)  # frees the one slot for the next waiter

    tasks = [asyncio.create_task(wait(f"bulk{i}", tenant="bulk")) for i in range(5)]
    await until(lambda: len(d.models["m"].queue) == 5)
    tasks.append(asyncio.create_task(wait("low", tenant="x", priority=common_pb2.PRIORITY_LOW)))
    tasks.append(asyncio.create_task(wait("other", tenant="other")))
    tasks.append(asyncio.create_task(wait("crit", tenant="x", priority=common_pb2.PRIORITY_CRITICAL)))
    await until(lambda: len(d.models["m"].queue) == 8)
    w.finish(lease.lease_id)
    d.release(lease.lease_id)
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order[0] == "crit"
    assert order.index("other") <= 2  # not behind the whole burst
    assert order[-1] == "low"


async def test_unclaimed_leases_expire_and_free_capacity() -> None:
    clock = Clock()
    d = dispatcher(clock=clock, lease_ttl=10.0)
    FakeWorker(d, "a:1", max_num_seqs=1)
    lease = (await d.admit(ticket())).lease
    waiter = asyncio.create_task(d.admit(ticket()))
    await until(lambda: len(d.models["m"].queue) == 1)
    clock.now += 9.9
    assert d.expire() == 0 and not waiter.done()
    clock.now += 0.2
    assert d.expire() == 1
    assert (await asyncio.wait_for(waiter, 1)).lease.address == "a:1"
    assert not d.release(lease.lease_id)  # already gone


async def test_a_started_lease_does_not_expire() -> None:
    clock = Clock()
    d = dispatcher(clock=clock, lease_ttl=1.0)
    w = FakeWorker(d, "a:1", max_num_seqs=2)
    lease = (await d.admit(ticket())).lease
    w.start(lease.lease_id, 100)
    w.report()
    clock.now += 60
    assert d.expire() == 0
    assert lease.lease_id in d.leases
    w.finish(lease.lease_id)
    w.report()
    assert lease.lease_id not in d.leases


async def test_a_lost_worker_releases_its_leases() -> None:
    d = dispatcher()
    FakeWorker(d, "a:1", max_num_seqs=8)
    b = FakeWorker(d, "b:1", max_num_seqs=8)
    leases = [(await d.admit(ticket())).lease for _ in range(6)]
    on_a = [x for x in leases if x.address == "a:1"]
    assert on_a
    d.on_lost("a:1", "stream broke")
    assert all(x.lease_id not in d.leases for x in on_a)
    assert d.pending_leases("a:1") == 0
    for _ in range(3):
        assert (await d.admit(ticket())).lease.address == b.address


async def test_a_refused_lease_holds_the_worker_back_until_its_next_report() -> None:
    d = dispatcher()
    w = FakeWorker(d, "a:1", max_num_seqs=4)
    lease = (await d.admit(ticket())).lease
    # Another replica took the room first: the worker refused our lease.
    assert d.release(lease.lease_id, "worker_failed")
    assert d.place(ticket()) is None
    w.report(extra_running=3)
    assert d.place(ticket()) is not None  # the report tells what is really free
    assert d.place(ticket()) is None


async def test_waiters_fail_fast_when_the_last_ready_worker_drains() -> None:
    d = dispatcher()
    w = FakeWorker(d, "a:1", max_num_seqs=1)
    await d.admit(ticket())
    waiter = asyncio.create_task(d.admit(ticket()))
    await until(lambda: len(d.models["m"].queue) == 1)
    w.draining = True
    w.report()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(waiter, 1)
