"""The worker set without workers: DNS changes add and drop workers; address parsing; the lease expiry timer."""

from __future__ import annotations

import asyncio
import time

import pytest
from infermesh.scheduler.admission import Ticket
from infermesh.scheduler.workers import WorkerPool, split_host_port

from tests.scheduler.fakes import FakeWorker, dispatcher


def test_split_host_port() -> None:
    assert split_host_port("worker-0.workers:50060") == ("worker-0.workers", 50060)
    assert split_host_port("[::1]:50060") == ("::1", 50060)
    for bad in ("nohost", "host:", ":80", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            split_host_port(bad)


async def test_re_resolution_adds_and_drops_workers() -> None:
    d = dispatcher()
    pool = WorkerPool(d, static=["127.0.0.1:1"], dns=["workers:50060"], stale_after=0.2)
    answers = [{"10.0.0.1:50060", "10.0.0.2:50060"}, {"10.0.0.2:50060", "10.0.0.3:50060"}]

    async def resolve() -> set[str]:
        return answers.pop(0)

    pool.resolve = resolve  # type: ignore[method-assign]
    try:
        await pool.refresh()
        assert set(pool.watches) == {"127.0.0.1:1", "10.0.0.1:50060", "10.0.0.2:50060"}
        await pool.refresh()
        assert set(pool.watches) == {"127.0.0.1:1", "10.0.0.2:50060", "10.0.0.3:50060"}
        assert "10.0.0.1:50060" not in d.workers
        # Nothing listens on these: each is tried once and counts as unreachable.
        await asyncio.wait_for(pool.wait_first_attempts(timeout=5), 6)
        assert all(w.attempted.is_set() for w in pool.watches.values())
        assert {a: w.state.name for a, w in d.workers.items()} == dict.fromkeys(
            ["127.0.0.1:1", "10.0.0.2:50060", "10.0.0.3:50060"], "UNREACHABLE")
    finally:
        await pool.stop()


async def test_the_expiry_timer_ends_an_unclaimed_lease_when_it_is_due() -> None:
    d = dispatcher(clock=time.monotonic, lease_ttl=0.3)
    w = FakeWorker(d, "a:1", max_num_seqs=2)
    pool = WorkerPool(d)
    await pool.start()
    try:
        claimed = (await d.admit(Ticket(model="m", tokens=10))).lease
        w.start(claimed.lease_id, 10)
        w.report()
        assert d.leases.next_expiry() is None  # a started lease never expires
        granted = time.monotonic()
        lease = (await d.admit(Ticket(model="m", tokens=10))).lease
        assert d.leases.next_expiry() == pytest.approx(granted + 0.3, abs=0.05)
        while lease.lease_id in d.leases:
            assert time.monotonic() - granted < 0.3 + 0.5, "the unclaimed lease did not expire"
            await asyncio.sleep(0.005)
        assert time.monotonic() - granted >= 0.3
        assert claimed.lease_id in d.leases and d.leases.next_expiry() is None
    finally:
        await pool.stop()
