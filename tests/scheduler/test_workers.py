"""The worker set without workers: DNS changes add and drop workers; address parsing."""

from __future__ import annotations

import asyncio

import pytest

from infermesh.scheduler.workers import WorkerPool, split_host_port
from tests.scheduler.fakes import dispatcher


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
