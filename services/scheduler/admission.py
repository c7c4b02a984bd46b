"""The admission queue of one model: priority classes, tenant fairness, bounds, drain rate.

Requests wait in strict priority order (CRITICAL, HIGH, NORMAL, LOW;
UNSPECIFIED counts as NORMAL). Within a priority, tenants take turns by
weighted round-robin: a tenant of weight w is served up to w requests per
turn, so one tenant's burst queues behind itself, not in front of everyone.
Every operation is O(1); a request that gives up (timeout, cancellation) is
marked dead and skipped when it reaches the front.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from infermesh.v1 import common_pb2

PRIORITY_NAMES: dict[int, str] = {common_pb2.PRIORITY_CRITICAL: "critical", common_pb2.PRIORITY_HIGH: "high",
                  common_pb2.PRIORITY_NORMAL: "normal", common_pb2.PRIORITY_LOW: "low"}
LEVELS = tuple(sorted(PRIORITY_NAMES))


def priority_level(priority: int) -> int:
    """The queue level of a Priority value (UNSPECIFIED and unknown values: NORMAL)."""
    return priority if priority in PRIORITY_NAMES else common_pb2.PRIORITY_NORMAL


@dataclass(eq=False, slots=True)
class Ticket:
    """One request asking for a lease."""

    model: str
    tokens: int  # KV tokens the worker commits: prompt plus n * max_tokens
    seqs: int = 1  # sequences it runs (n)
    length: int = 0  # its longest sequence, prompt plus max_tokens (0: `tokens`)
    tenant: str = ""
    priority: int = common_pb2.PRIORITY_NORMAL
    prefix_hashes: Sequence[int] = ()
    constraint_hash: int = 0  # the output constraint's class (0: none)
    exclude: frozenset[str] = frozenset()
    request_id: str = ""
    version_pinned: bool = False  # the caller asked for this version itself (served even when rolled back)
    enqueued_at: float = 0.0
    future: asyncio.Future[Any] | None = None
    dead: bool = False


@dataclass
class _Level:
    """One priority class: a deque per tenant and a ring of tenants with requests."""

    tenants: dict[str, collections.deque[Ticket]] = field(default_factory=dict)
    ring: collections.deque[str] = field(default_factory=collections.deque)
    credit: int = 0  # turns left for ring[0]
    live: dict[str, int] = field(default_factory=dict)  # tenant -> tickets still waiting


class FairQueue:
    """Priority classes, weighted round-robin between tenants within a class."""

    def __init__(self, tenant_weights: Mapping[str, int] | None = None) -> None:
        self.weights = dict(tenant_weights or {})
        self._levels = {level: _Level() for level in LEVELS}
        self._live = dict.fromkeys(LEVELS, 0)
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def depth(self, level: int) -> int:
        return self._live[level]

    def _weight(self, tenant: str) -> int:
        return max(1, self.weights.get(tenant, 1))

    def push(self, ticket: Ticket) -> None:
        level = priority_level(ticket.priority)
        lv = self._levels[level]
        queue = lv.tenants.get(ticket.tenant)
        if queue is None:
            queue = lv.tenants[ticket.tenant] = collections.deque()
            lv.ring.append(ticket.tenant)
            if len(lv.ring) == 1:
                lv.credit = self._weight(ticket.tenant)
        queue.append(ticket)
        lv.live[ticket.tenant] = lv.live.get(ticket.tenant, 0) + 1
        self._live[level] += 1
        self._len += 1

    def _unlive(self, lv: _Level, tenant: str) -> None:
        left = lv.live[tenant] - 1
        if left:
            lv.live[tenant] = left
        else:
            del lv.live[tenant]

    def discard(self, ticket: Ticket) -> None:
        """Marks a waiting ticket dead (it leaves when it reaches the front)."""
        if not ticket.dead:
            ticket.dead = True
            level = priority_level(ticket.priority)
            self._unlive(self._levels[level], ticket.tenant)
            self._live[level] -= 1
            self._len -= 1

    def _front(self, lv: _Level) -> Ticket | None:
        while lv.ring:
            tenant = lv.ring[0]
            queue = lv.tenants[tenant]
            while queue and queue[0].dead:
                queue.popleft()
            if queue:
                return queue[0]
            del lv.tenants[tenant]
            lv.ring.popleft()
            lv.credit = self._weight(lv.ring[0]) if lv.ring else 0
        return None

    def peek(self) -> Ticket | None:
        """The next ticket to serve, without removing it."""
        if not self._len:
            return None
        for level in LEVELS:
            if self._live[level]:
                ticket = self._front(self._levels[level])
                if ticket is not None:
                    return ticket
        return None

    def pop(self) -> Ticket | None:
        ticket = self.peek()
        if ticket is None:
            return None
        level = priority_level(ticket.priority)
        lv = self._levels[level]
        tenant = lv.ring[0]
        queue = lv.tenants[tenant]
        queue.popleft()
        self._unlive(lv, tenant)
        self._live[level] -= 1
        self._len -= 1
        lv.credit -= 1
        if not queue:
            del lv.tenants[tenant]
            lv.ring.popleft()
            lv.credit = self._weight(lv.ring[0]) if lv.ring else 0
        elif lv.credit <= 0:
            lv.ring.rotate(-1)
            lv.credit = self._weight(lv.ring[0])
        return ticket

    def ahead(self, tenant: str, priority: int) -> int:
        """About how many waiting tickets a new one of `tenant` at `priority` would be served after.

        Every higher priority first; within its own, its tenant's earlier tickets and, from each
        other tenant, at most what weighted round-robin serves in the turns until its own.
        """
        level = priority_level(priority)
        n = sum(self._live[higher] for higher in LEVELS if higher < level)
        lv = self._levels[level]
        mine = lv.live.get(tenant, 0)
        turns = mine // self._weight(tenant) + 1
        for other, count in lv.live.items():
            n += count if other == tenant else min(count, turns * self._weight(other))
        return n

    def drain(self) -> list[Ticket]:
        """Removes and returns every live ticket."""
        out = []
        while (ticket := self.pop()) is not None:
            out.append(ticket)
        return out


class DrainRate:
    """Requests leaving the queue per second, over the last `window` departures."""

    def __init__(self, window: int = 64) -> None:
        self._times: collections.deque[float] = collections.deque(maxlen=window)

    def record(self, now: float) -> None:
        self._times.append(now)

    def rate(self, now: float) -> float | None:
        if len(self._times) < 2:
            return None
        span = max(now, self._times[-1]) - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else None

    def retry_after(self, depth: int, now: float, *, floor: float = 0.05, ceiling: float = 30.0,
                    default: float = 1.0) -> float:
        """Seconds until `depth` waiting requests are likely to have left the queue."""
        rate = self.rate(now)
        if rate is None:
            return min(ceiling, default)
        return min(ceiling, max(floor, depth / rate))


class ServiceRate:
    """How fast the queue moves while somebody waits: departures per second of busy time.

    Busy time is time with at least one ticket waiting, so idle periods (when
    capacity frees with nobody to take it) neither dilute nor age the estimate.
    Departures are weighted by exp(-age / tau), age in busy seconds, with the
    weights' normalisation for a short history; a queue that stops moving
    decays towards 0. `rate` is None until `min_samples` departures were seen.
    """

    def __init__(self, tau: float = 5.0, min_samples: int = 8) -> None:
        self.tau = tau
        self.min_samples = min_samples
        self.samples = 0
        self._busy = 0.0  # busy seconds before the current busy period
        self._since: float | None = None  # start of the current busy period
        self._weight = 0.0  # decayed departure count as of busy time `_at`
        self._at = 0.0

    def _busy_time(self, now: float) -> float:
        return self._busy + (now - self._since if self._since is not None else 0.0)

    def busy(self, now: float, waiting: bool) -> None:
        """Tells whether tickets are waiting from `now` on."""
        if waiting:
            if self._since is None:
                self._since = now
        elif self._since is not None:
            self._busy += max(0.0, now - self._since)
            self._since = None

    def record(self, now: float) -> None:
        """One ticket left the queue with a grant."""
        at = self._busy_time(now)
        self._weight = self._weight * math.exp((self._at - at) / self.tau) + 1.0
        self._at = at
        self.samples += 1

    def rate(self, now: float) -> float | None:
        if self.samples < self.min_samples:
            return None
        at = self._busy_time(now)
        norm = self.tau * -math.expm1(-at / self.tau)
        if norm <= 0:
            return None
        return self._weight * math.exp((self._at - at) / self.tau) / norm
