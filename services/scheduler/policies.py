"""Routing policies: which of the workers that can take a request gets it.

Every policy chooses among candidates that already fit the request (the
capacity check never lets a policy overcommit). `prefix_affinity` is
cache-aware in the manner of SGLang's router: each worker has an approximate
index of the prefix block hashes recently routed to it; a request goes to the
worker with the longest cached prefix unless that worker is loaded beyond the
least-loaded one by both an absolute and a relative threshold, in which case
the request is balanced to the least-loaded worker instead.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from infermesh.scheduler.capacity import WorkerCapacity

POLICIES = ("prefix_affinity", "least_load", "round_robin")


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[WorkerCapacity], prefix_hashes: Sequence[int]
               ) -> tuple[WorkerCapacity, str]:
        """The chosen worker and the decision's outcome label."""

    def routed(self, worker: WorkerCapacity, prefix_hashes: Sequence[int]) -> None:
        """A lease was granted on `worker` for a prompt with these hashes."""

    def forget(self, address: str) -> None:
        """The worker is gone (its cache with it)."""


def _least_loaded(candidates: Sequence[WorkerCapacity]) -> WorkerCapacity:
    # Fewest sequences held or promised; then the most free KV.
    return min(candidates, key=lambda w: (w.load(), -w.free_tokens()))


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[WorkerCapacity], prefix_hashes: Sequence[int]
               ) -> tuple[WorkerCapacity, str]:
        return candidates[next(self._turn) % len(candidates)], "rotation"

    def routed(self, worker: WorkerCapacity, prefix_hashes: Sequence[int]) -> None:
        pass

    def forget(self, address: str) -> None:
        pass


class LeastLoad(RoundRobin):
    name = "least_load"

    def choose(self, candidates: Sequence[WorkerCapacity], prefix_hashes: Sequence[int]
               ) -> tuple[WorkerCapacity, str]:
        return _least_loaded(candidates), "least_loaded"


class PrefixIndex:
    """An LRU set of the prefix block hashes recently routed to one worker.

    It evicts as the worker's cache does (vLLM frees a request's blocks last to first): within a
    prompt the tail goes before the head.
    """

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = max(1, capacity_blocks)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` held (a scan: a block counts only with all of its predecessors)."""
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        blocks = self._blocks
        for h in reversed(hashes):  # the head ends most recently used
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


class PrefixAffinity:
    name = "prefix_affinity"

    def __init__(self, balance_abs_threshold: int = 8, balance_rel_threshold: float = 1.5,
                 index_blocks: int = 0) -> None:
        self.abs_threshold = balance_abs_threshold
        self.rel_threshold = balance_rel_threshold
        self.index_blocks = index_blocks
        self._indexes: dict[str, PrefixIndex] = {}

    def _index(self, worker: WorkerCapacity) -> PrefixIndex:
        index = self._indexes.get(worker.address)
        if index is None:
            blocks = self.index_blocks or max(1, worker.kv_capacity_tokens // max(1, worker.block_size))
            index = self._indexes[worker.address] = PrefixIndex(blocks)
        return index

    def imbalanced(self, chosen: WorkerCapacity, least: WorkerCapacity) -> bool:
        a, b = chosen.load(), least.load()
        return a - b > self.abs_threshold and a > b * self.rel_threshold

    def choose(self, candidates: Sequence[WorkerCapacity], prefix_hashes: Sequence[int]
               ) -> tuple[WorkerCapacity, str]:
        least = _least_loaded(candidates)
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

    def routed(self, worker: WorkerCapacity, prefix_hashes: Sequence[int]) -> None:
        if prefix_hashes:
            self._index(worker).insert(prefix_hashes)

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
