"""Draining a frontend behind a load balancer without failing a request.

On SIGTERM the frontend tells the edge to stop sending it work and keeps
serving what still arrives until requests stop coming (or a limit passes);
only then does it close its listener and finish what is in flight. The edge
learns it at once: `/health` answers 503, and every response carries
`x-envoy-immediate-health-check-fail`, which makes Envoy mark the host as
failed on the spot instead of after its next health checks.
"""

from __future__ import annotations

import asyncio
import time

IMMEDIATE_FAIL_HEADER = (b"x-envoy-immediate-health-check-fail", b"true")


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.last_request = time.monotonic()

    def touch(self) -> None:
        """A request arrived."""
        self.last_request = time.monotonic()

    def start(self) -> None:
        self.draining = True
        self.touch()

    async def wait_quiet(self, quiet: float = 1.0, limit: float = 5.0) -> float:
        """Waits until no request arrived for `quiet` seconds, at most `limit`; returns the time waited."""
        started = time.monotonic()
        while True:
            now = time.monotonic()
            if now - self.last_request >= quiet or now - started >= limit:
                return now - started
            await asyncio.sleep(min(0.05, quiet))
