"""What the worker holds: admission against its capacity, leases, and load-report watchers.

`LoadTracker.hold()` admits a request or raises Overloaded: the sequences held
(running plus waiting) may not exceed `max_num_seqs`, and the tokens committed
(prompt plus max_tokens, per choice) may not exceed the KV capacity. An embed
request (`hold_embed`) holds one sequence and its input tokens. A lease
starts when its request is held and finishes when it is released, however the
stream ended; every watcher hears of both at its next report, and reports are
sent at once when leases change.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from infermesh.common.errors import Overloaded
from infermesh.gpu_worker.engine import EmbedRequest, GenerateRequest
from infermesh.v1 import worker_pb2

# A refused caller should retry elsewhere soon; this is the hint it gets.
RETRY_AFTER_S = 0.2


@dataclass(eq=False)
class Held:
    key: str  # the engine's request id (unique)
    request_id: str  # the caller's request id (for Abort)
    lease_id: str
    seqs: int
    tokens: int


@dataclass(eq=False)
class Watcher:
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    results: list[worker_pb2.LeaseResult] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class LoadTracker:
    def __init__(self, max_num_seqs: int, kv_capacity_tokens: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.kv_capacity_tokens = kv_capacity_tokens
        self.held: dict[str, Held] = {}
        self.seq = itertools.count(1)
        self.draining = False
        self.closing = False
        self._watchers: set[Watcher] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def held_seqs(self) -> int:
        return sum(h.seqs for h in self.held.values())

    @property
    def committed_tokens(self) -> int:
        return sum(h.tokens for h in self.held.values())

    def leases_active(self) -> list[str]:
        return [h.lease_id for h in self.held.values() if h.lease_id]

    def hold(self, request: GenerateRequest, caller_id: str, lease_id: str) -> Held:
        return self.hold_work(request.request_id, caller_id, lease_id, request.n,
                              len(request.prompt_ids) + request.max_tokens * request.n)

    def hold_embed(self, request: EmbedRequest, caller_id: str, lease_id: str) -> Held:
        """An embed request holds one of the sequences (requests, for an embed worker) and its input tokens.

        Its start wakes no watcher: a batch lasts milliseconds, and its end (or the next periodic report,
        whose snapshot lists it) tells the schedulers, which count the lease as theirs until then. That is
        one load report per request instead of two.
        """
        return self.hold_work(request.request_id, caller_id, lease_id, 1, request.tokens, announce=False)

    def hold_work(self, key: str, caller_id: str, lease_id: str, seqs: int, tokens: int, *,
                  announce: bool = True) -> Held:
        if self.held_seqs + seqs > self.max_num_seqs:
            raise Overloaded(f"worker at capacity: {self.held_seqs} of {self.max_num_seqs} sequences held",
                             retry_after=RETRY_AFTER_S)
        if self.committed_tokens + tokens > self.kv_capacity_tokens:
            raise Overloaded(f"worker at capacity: {self.committed_tokens} of {self.kv_capacity_tokens} KV tokens "
                             f"committed, the request needs {tokens}", retry_after=RETRY_AFTER_S)
        held = Held(key, caller_id, lease_id, seqs, tokens)
        self.held[held.key] = held
        self._idle.clear()
        if lease_id:
            for w in self._watchers:
                w.started.append(lease_id)
                if announce:
                    w.wake.set()
        return held

    def release(self, held: Held, result: worker_pb2.LeaseResult | None = None) -> None:
        """The request ended; `result` says how (reported with the lease's end, for the canary analysis)."""
        if self.held.pop(held.key, None) is None:
            return
        if held.lease_id:
            for w in self._watchers:
                w.finished.append(held.lease_id)
                if result is not None:
                    w.results.append(result)
                w.wake.set()
        if not self.held:
            self._idle.set()

    def keys_for(self, request_id: str) -> list[str]:
        return [h.key for h in self.held.values() if h.request_id == request_id or h.key == request_id]

    def watch(self) -> Watcher:
        w = Watcher()
        self._watchers.add(w)
        return w

    def unwatch(self, w: Watcher) -> None:
        self._watchers.discard(w)

    def wake_all(self) -> None:
        for w in self._watchers:
            w.wake.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
