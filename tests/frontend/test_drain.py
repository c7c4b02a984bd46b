"""The drain waits for requests to stop arriving, within a limit."""

from __future__ import annotations

import asyncio

from infermesh.frontend.drain import Drain


async def test_quiet_drain_returns_after_the_quiet_period() -> None:
    drain = Drain()
    drain.start()
    waited = await drain.wait_quiet(quiet=0.1, limit=5)
    assert 0.1 <= waited < 1.0


async def test_drain_waits_while_requests_keep_coming_up_to_the_limit() -> None:
    drain = Drain()
    drain.start()

    async def traffic() -> None:
        while True:
            drain.touch()
            await asyncio.sleep(0.02)

    task = asyncio.create_task(traffic())
    try:
        waited = await drain.wait_quiet(quiet=0.1, limit=0.5)
    finally:
        task.cancel()
    assert 0.5 <= waited < 1.5
