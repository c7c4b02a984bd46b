"""What each worker can still take: its latest load report less this scheduler's pending leases.

The worker is the source of truth. A lease this scheduler granted counts as
*pending* (its n sequences, prompt plus n * max_tokens of KV) only until the worker
reports it (started, finished, or in its `leases_active` snapshot); from then
on the worker's own `running` and `committed_tokens` include it. So several
scheduler replicas over the same workers each subtract only what the workers
have not told everyone yet, and the worker refuses what it cannot hold.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

REPLICA_MEMORY = 2.0


class State(enum.IntEnum):
    """Values match `infermesh.v1.WorkerState`."""

    CONNECTING = 0
    READY = 1
    DRAINING = 2
    UNREACHABLE = 3


@dataclass
class WorkerCapacity:
    """One worker as this scheduler sees it."""

    address: str
    worker_id: str = ""
    model: str = ""
    state: State = State.CONNECTING
    max_num_seqs: int = 0
    kv_capacity_tokens: int = 0
    max_model_len: int = 0
    block_size: int = 0  # the engine's KV block size (0: not reported yet)
    simulated: bool = False
    task: str = "generate"  # or "embed": its requests hold one sequence and their input tokens each
    embedding_dim: int = 0  # an embed worker's vector length (0: not reported yet)
    running: int = 0
    waiting: int = 0
    held_seqs: int = 0  # running + waiting, or the leases active if the engine lags behind them
    committed_tokens: int = 0
    report: Any = None  # the latest LoadReport (for ListWorkers and metrics)
    # lease id -> (tokens, sequences): our leases not yet reported, and those the worker reports running.
    pending: dict[str, tuple[int, int]] = field(default_factory=dict)
    pending_tokens: int = 0
    pending_seqs: int = 0
    confirmed: dict[str, tuple[int, int]] = field(default_factory=dict)
    confirmed_tokens: int = 0
    confirmed_seqs: int = 0
    # Replicas sharing the worker (see `share`): this scheduler's lease-id prefix, the number of
    # replicas with leases on the worker, and this one's rank among them.
    replica: str = ""
    replicas: int = 1
    rank: int = 0
    seen: dict[str, float] = field(default_factory=dict)  # replica prefix -> when last seen active
    # The worker refused one of our leases: its numbers are stale (another replica took the room),
    # so nothing more goes to it until its next report.
    refused: bool = False

    @property
    def name(self) -> str:
        return self.worker_id or self.address

    def free_seqs(self) -> int:
        return self.max_num_seqs - self.held_seqs - self.pending_seqs

    def free_tokens(self) -> int:
        return self.kv_capacity_tokens - self.committed_tokens - self.pending_tokens

    def load(self) -> int:
        """Sequences held or promised: the unit of the routing policies' balance."""
        return self.held_seqs + self.pending_seqs

    def can_ever_fit(self, tokens: int, seqs: int = 1, length: int = 0) -> bool:
        """True when an idle worker could hold `seqs` sequences of at most `length` using `tokens` of KV."""
        length = length or tokens
        return (tokens <= self.kv_capacity_tokens and seqs <= self.max_num_seqs
                and (not self.max_model_len or length <= self.max_model_len))

    def fits(self, tokens: int, seqs: int = 1) -> bool:
        """True when a new lease of `seqs` sequences and `tokens` fits now. Never overcommits."""
        return (self.state is State.READY and not self.refused and self.free_seqs() >= seqs
                and self.free_tokens() >= tokens and self.within_share(tokens, seqs))

    def share(self) -> tuple[int, int]:
        """This replica's share of the worker (sequences, KV tokens) while others use it too.

        Every replica reads the same snapshot of the worker's active leases, so all agree on how
        many replicas use it and on their ranks (lease ids start with the replica's prefix); each
        keeps its own leases (running and pending) within 1/k of the worker, so together they
        never exceed it, however their grants interleave between reports.
        """
        k, r = self.replicas, self.rank
        seqs = len(range(r, self.max_num_seqs, k))
        tokens = self.kv_capacity_tokens * (r + 1) // k - self.kv_capacity_tokens * r // k
        return seqs, tokens

    def within_share(self, tokens: int, seqs: int = 1) -> bool:
        if self.replicas <= 1:
            return True
        share_seqs, kv = self.share()
        mine = self.pending_seqs + self.confirmed_seqs
        if mine == 0 and (seqs > share_seqs or tokens > kv):
            return True  # a share too small for even one request must not starve it
        return mine + seqs <= share_seqs and self.pending_tokens + self.confirmed_tokens + tokens <= kv

    def reserve(self, lease_id: str, tokens: int, seqs: int = 1) -> None:
        self.pending[lease_id] = (tokens, seqs)
        self.pending_tokens += tokens
        self.pending_seqs += seqs

    def _unconfirm(self, lease_id: str) -> None:
        held = self.confirmed.pop(lease_id, None)
        if held is not None:
            self.confirmed_tokens -= held[0]
            self.confirmed_seqs -= held[1]

    def unreserve(self, lease_id: str) -> bool:
        """Forgets one of our leases; True when it was still pending."""
        self._unconfirm(lease_id)
        held = self.pending.pop(lease_id, None)
        if held is None:
            return False
        self.pending_tokens -= held[0]
        self.pending_seqs -= held[1]
        return True

    def apply_info(self, worker_id: str, model: str, max_num_seqs: int, kv_capacity_tokens: int,
                   max_model_len: int, block_size: int, simulated: bool, task: str = "",
                   embedding_dim: int = 0) -> None:
        self.worker_id = worker_id or self.worker_id
        self.task = task or self.task
        self.embedding_dim = embedding_dim or self.embedding_dim
        self.model = model or self.model
        self.max_num_seqs = max_num_seqs or self.max_num_seqs
        self.kv_capacity_tokens = kv_capacity_tokens or self.kv_capacity_tokens
        self.max_model_len = max_model_len or self.max_model_len
        self.block_size = block_size or self.block_size
        self.simulated = simulated

    def apply_report(self, report: Any, now: float = 0.0) -> tuple[list[str], list[str]]:
        """Takes a LoadReport; returns (our leases the worker now holds, our leases it finished)."""
        self.report = report
        self.worker_id = report.worker_id or self.worker_id
        self.model = report.model or self.model
        if report.max_num_seqs:
            self.max_num_seqs = report.max_num_seqs
        if report.kv_capacity_tokens:
            self.kv_capacity_tokens = report.kv_capacity_tokens
        if report.max_model_len:
            self.max_model_len = report.max_model_len
        if report.block_size:
            self.block_size = report.block_size
        if report.embedding_dim:
            self.embedding_dim = report.embedding_dim
        self.running = report.running
        self.waiting = report.waiting
        self.committed_tokens = report.committed_tokens
        self.held_seqs = max(report.running + report.waiting, len(report.leases_active))
        # A worker whose engine is still starting reports no capacity yet: it is not ready for requests.
        self.state = State.DRAINING if report.draining else State.READY if report.max_num_seqs else State.CONNECTING
        self.refused = False
        if self.replica:
            self._count_replicas(report.leases_active, now)
        finished = [lid for lid in report.leases_finished if lid in self.pending or lid in self.confirmed]
        for lid in finished:
            self.unreserve(lid)
        active = set(report.leases_active)
        active.update(report.leases_started)
        active.difference_update(report.leases_finished)
        started = []
        if self.pending:
            started = [lid for lid in active if lid in self.pending]
            for lid in started:
                held = self.pending.pop(lid)
                self.pending_tokens -= held[0]
                self.pending_seqs -= held[1]
                self.confirmed[lid] = held
                self.confirmed_tokens += held[0]
                self.confirmed_seqs += held[1]
        # A confirmed lease missing from the snapshot has ended (its finish may have been missed).
        gone = [lid for lid in self.confirmed if lid not in active]
        for lid in gone:
            self._unconfirm(lid)
        # The snapshot lists leases, not sequences: ours of n > 1 hold n each (others' are the worker's to refuse).
        self.held_seqs = max(self.held_seqs, len(report.leases_active) + self.confirmed_seqs - len(self.confirmed))
        return started, finished + gone

    def _count_replicas(self, leases_active: Sequence[str], now: float) -> None:
        # A replica counts while it had a lease here within REPLICA_MEMORY seconds, so that
        # membership (and everyone's share) does not flap as its leases come and go.
        seen = self.seen
        for lid in leases_active:
            seen[lid.partition("-")[0]] = now
        seen[self.replica] = now
        for prefix in [p for p, t in seen.items() if now - t > REPLICA_MEMORY]:
            del seen[prefix]
        ranked = sorted(seen)
        self.replicas = len(ranked)
        self.rank = ranked.index(self.replica)

    def lose(self) -> list[str]:
        """The worker is unreachable: every lease on it ends; returns their ids."""
        self.state = State.UNREACHABLE
        ids = [*self.pending, *self.confirmed]
        self.pending.clear()
        self.confirmed.clear()
        self.pending_tokens = self.confirmed_tokens = self.pending_seqs = self.confirmed_seqs = 0
        self.replicas, self.rank = 1, 0
        self.seen.clear()
        self.running = self.waiting = self.held_seqs = self.committed_tokens = 0
        return ids
