"""Routing policies: which of the workers that can take a request gets it.

Every policy chooses among candidates that already fit the request (the
capacity check never lets a policy overcommit). `prefix_affinity` is
cache-aware in the manner of SGLang's router: each worker has an approximate
index of the prefix block hashes recently routed to it; a request goes to the
worker with the longest cached prefix unless that worker is loaded beyond the
least-loaded one by both an absolute and a relative threshold, in which case
the request is balanced to the least-loaded worker instead.

A policy sees the whole admission request (the `Ticket`: its prefix hashes,
model, tenant, priority, size), not only its hashes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

from infermesh.common.prefix import DEFAULT_BLOCK_SIZE, PrefixLRU
from infermesh.scheduler.admission import Ticket
from infermesh.scheduler.capacity import WorkerCapacity

POLICIES = ("prefix_affinity", "least_load", "round_robin")


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[WorkerCapacity], ticket: Ticket) -> tuple[WorkerCapacity, str]:
        """The chosen worker for `ticket` and the decision's outcome label."""

    def routed(self, worker: WorkerCapacity, ticket: Ticket) -> None:
        """A lease was granted on `worker` for `ticket`."""

    def forget(self, address: str) -> None:
        """The worker is gone (its cache with it)."""


def _least_loaded(candidates: Sequence[WorkerCapacity]) -> WorkerCapacity:
    # Fewest sequences held or promised; then the most free KV.
    return min(candidates, key=lambda w: (w.load(), -w.free_tokens()))


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[WorkerCapacity], ticket: Ticket) -> tuple[WorkerCapacity, str]:
        return candidates[next(self._turn) % len(candidates)], "rotation"

    def routed(self, worker: WorkerCapacity, ticket: Ticket) -> None:
        pass

    def forget(self, address: str) -> None:
        pass


class LeastLoad(RoundRobin):
    name = "least_load"

    def choose(self, candidates: Sequence[WorkerCapacity], ticket: Ticket) -> tuple[WorkerCapacity, str]:
        return _least_loaded(candidates), "least_loaded"


class PrefixAffinity:
    name = "prefix_affinity"

    def __init__(self, balance_abs_threshold: int = 8, balance_rel_threshold: float = 1.5,
                 index_blocks: int = 0) -> None:
        self.abs_threshold = balance_abs_threshold
        self.rel_threshold = balance_rel_threshold
        self.index_blocks = index_blocks
        # Per worker, the prefix blocks recently routed to it: an approximation of its cache.
        self._indexes: dict[str, PrefixLRU] = {}

    def _index(self, worker: WorkerCapacity) -> PrefixLRU:
        index = self._indexes.get(worker.address)
        if index is None:
            blocks = self.index_blocks or worker.kv_capacity_tokens // (worker.block_size or DEFAULT_BLOCK_SIZE)
            index = self._indexes[worker.address] = PrefixLRU(max(1, blocks))
        return index

    def imbalanced(self, chosen: WorkerCapacity, least: WorkerCapacity) -> bool:
        a, b = chosen.load(), least.load()
        return a - b > self.abs_threshold and a > b * self.rel_threshold

    def choose(self, candidates: Sequence[WorkerCapacity], ticket: Ticket) -> tuple[WorkerCapacity, str]:
        least = _least_loaded(candidates)
        prefix_hashes = ticket.prefix_hashes
        if not prefix_hashes:
            return least, "no_prefix"
        best, best_len = least, 0
        for worker in candidates:
            n = self._index(worker).match(prefix_hashes)
            if n > best_len or (n == best_len and n and worker.load() < best.load()):
                best, best_len = worker, n
        if best_len == 0:
            # A new prefix: the least-loaded worker, and among equals the one caching least.
            return min(candidates, key=lambda w: (w.load(), len(self._index(w)), -w.free_tokens())), "miss"
        if best is not least and self.imbalanced(best, least):
            return least, "imbalanced"
        return best, "hit"

    def routed(self, worker: WorkerCapacity, ticket: Ticket) -> None:
        if ticket.prefix_hashes:
            self._index(worker).insert(ticket.prefix_hashes)

    def forget(self, address: str) -> None:
        self._indexes.pop(address, None)


def make_policy(name: str, *, balance_abs_threshold: int = 8, balance_rel_threshold: float = 1.5,
                index_blocks: int = 0) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    if name == "prefix_affinity":
        return PrefixAffinity(balance_abs_threshold, balance_rel_threshold, index_blocks)
    raise ValueError(f"unknown policy {name!r} (one of {', '.join(POLICIES)})")
