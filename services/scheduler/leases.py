"""Leases: a grant of one request's capacity on one worker, until the worker reports it.

A lease is *pending* from the grant until the worker's load stream reports it
started (then the worker's own numbers count it) and ends when the worker
reports it finished, the caller releases it, its worker is lost, or it expires
(never claimed within the lease time-to-live).
"""

from __future__ import annotations

import heapq
import itertools
import os
from dataclasses import dataclass


@dataclass(slots=True)
class Lease:
    lease_id: str
    address: str
    worker_id: str
    tokens: int
    granted_at: float  # monotonic
    expires_at: float  # monotonic
    started: bool = False


class LeaseTable:
    """Every live lease of this scheduler, with expiry in O(log n)."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._expiry: list[tuple[float, str]] = []
        # Unique across scheduler replicas and restarts: a random prefix and a counter.
        self.prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self._leases

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def grant(self, address: str, worker_id: str, tokens: int, now: float, ttl: float) -> Lease:
        lease = Lease(f"{self.prefix}-{next(self._counter):x}", address, worker_id, tokens, now, now + ttl)
        self._leases[lease.lease_id] = lease
        heapq.heappush(self._expiry, (lease.expires_at, lease.lease_id))
        return lease

    def mark_started(self, lease_id: str) -> None:
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.started = True

    def pop(self, lease_id: str) -> Lease | None:
        return self._leases.pop(lease_id, None)

    def next_expiry(self) -> float | None:
        """When the earliest lease that can still expire (granted, not started) is due; None: none."""
        expiry = self._expiry
        while expiry:
            lease = self._leases.get(expiry[0][1])
            if lease is not None and not lease.started:
                return expiry[0][0]
            heapq.heappop(expiry)  # started or gone: it never expires
        return None

    def pop_expired(self, now: float) -> list[Lease]:
        """Removes and returns the pending leases whose time is up (started ones never expire)."""
        out = []
        while self._expiry and self._expiry[0][0] <= now:
            _, lease_id = heapq.heappop(self._expiry)
            lease = self._leases.get(lease_id)
            if lease is not None and not lease.started:
                del self._leases[lease_id]
                out.append(lease)
        return out
