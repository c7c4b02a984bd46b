"""Routing policies: which of the workers that can take a request gets it.

Every policy chooses among candidates that already fit the request (the
capacity check never lets a policy overcommit). `prefix_affinity` is
cache-aware in the manner of SGLang's router: each worker has an approximate
index of the prefix block hashes recently routed to it; a request goes to the
worker with the longest cached prefix unless that worker is loaded beyond the
least-loaded one by both an absolute and a relative threshold, in which case
the request is balanced to the least-loaded worker instead. A constrained
request (a JSON schema, the grammar of required tool calls) also prefers,
among workers with an equal prefix, one it already sent that constraint to:
that worker has its grammar compiled (xgrammar's cache: ~90 ms for a small
schema on a 2-core CPU the first time, ~0.1 ms after); with no prefix cached
anywhere, such a worker is chosen (outcome `grammar`) unless it is imbalanced.

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
# The constraints remembered per worker (xgrammar's compile cache holds far more; this is what routing uses).
GRAMMARS_PER_WORKER = 512


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
        # Per worker, the output constraints recently routed to it: its compiled grammars.
        self._grammars: dict[str, PrefixLRU] = {}

    def _index(self, worker: WorkerCapacity) -> PrefixLRU:
        index = self._indexes.get(worker.address)
        if index is None:
            blocks = self.index_blocks or worker.kv_capacity_tokens // (worker.block_size or DEFAULT_BLOCK_SIZE)
            index = self._indexes[worker.address] = PrefixLRU(max(1, blocks))
        return index

    def imbalanced(self, chosen: WorkerCapacity, least: WorkerCapacity) -> bool:
        a, b = chosen.load(), least.load()
        return a - b > self.abs_threshold and a > b * self.rel_threshold

    def _compiled(self, worker: WorkerCapacity, constraint: int) -> bool:
        grammars = self._grammars.get(worker.address)
        return bool(constraint) and grammars is not None and grammars.match([constraint]) == 1

    def choose(self, candidates: Sequence[WorkerCapacity], ticket: Ticket) -> tuple[WorkerCapacity, str]:
        least = _least_loaded(candidates)
        prefix_hashes = ticket.prefix_hashes
        constraint = ticket.constraint_hash
        if not prefix_hashes and not constraint:
            return least, "no_prefix"
        best, best_key = least, (0, False)
        for worker in candidates:
            key = (self._index(worker).match(prefix_hashes) if prefix_hashes else 0,
                   self._compiled(worker, constraint))
            if key > best_key or (key == best_key and key[0] and worker.load() < best.load()):
                best, best_key = worker, key
        best_len, compiled = best_key
        if best_len == 0:
            warm = [w for w in candidates if self._compiled(w, constraint)] if compiled else []
            if warm:
                chosen = _least_loaded(warm)
                if chosen is least or not self.imbalanced(chosen, least):
                    return chosen, "grammar"
            if not prefix_hashes:
                return least, "no_prefix"
            # A new prefix: the least-loaded worker, and among equals the one caching least.
            return min(candidates, key=lambda w: (w.load(), len(self._index(w)), -w.free_tokens())), "miss"
        if best is not least and self.imbalanced(best, least):
            return least, "imbalanced"
        return best, "hit"

    def routed(self, worker: WorkerCapacity, ticket: Ticket) -> None:
        if ticket.prefix_hashes:
            self._index(worker).insert(ticket.prefix_hashes)
        if ticket.constraint_hash:
            grammars = self._grammars.get(worker.address)
            if grammars is None:
                grammars = self._grammars[worker.address] = PrefixLRU(GRAMMARS_PER_WORKER)
            grammars.insert([ticket.constraint_hash])

    def forget(self, address: str) -> None:
        self._indexes.pop(address, None)
        self._grammars.pop(address, None)


def make_policy(name: str, *, balance_abs_threshold: int = 8, balance_rel_threshold: float = 1.5,
                index_blocks: int = 0) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    if name == "prefix_affinity":
        return PrefixAffinity(balance_abs_threshold, balance_rel_threshold, index_blocks)
    raise ValueError(f"unknown policy {name!r} (one of {', '.join(POLICIES)})")
