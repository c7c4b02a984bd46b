"""The scheduler's core: admission queues, worker capacity, leases and the routing policy together.

`Dispatcher.admit` grants a lease at once when a worker has room and nobody is
waiting for the model; otherwise the request waits in the model's `FairQueue`
until capacity frees up (a load report, a release, an expiry), its queue
timeout or deadline passes, or the caller goes away. All state lives on one
event loop: no locks, O(workers) work per grant.

With a time-to-first-token SLO (`Limits.ttft_slo`), a request waits at most
`Limits.budget()` (a share of the SLO, and never past the queue timeout), then
is refused as overloaded; one whose expected wait (its place in the queue over
the rate the queue has been moving, `ServiceRate`) already exceeds the budget
is refused at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from infermesh.common.errors import (
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    Overloaded,
    QueueTimeout,
    Unavailable,
    VersionRolledBack,
)
from infermesh.scheduler import metrics
from infermesh.scheduler.admission import PRIORITY_NAMES, DrainRate, FairQueue, ServiceRate, Ticket, priority_level
from infermesh.scheduler.capacity import State, WorkerCapacity
from infermesh.scheduler.leases import Lease, LeaseTable
from infermesh.scheduler.policies import Policy
from infermesh.scheduler.versions import VersionBook

logger = logging.getLogger(__name__)


@dataclass
class Limits:
    max_queue: int = 128
    queue_timeout: float = 30.0
    lease_ttl: float = 10.0
    ttft_slo: float = 0.0  # seconds; 0: no SLO
    slo_queue_share: float = 0.5  # of the SLO a request may spend waiting for admission

    def budget(self) -> float | None:
        """The longest an SLO lets a request wait in the queue (None without an SLO)."""
        if self.ttft_slo <= 0:
            return None
        return min(self.queue_timeout, self.ttft_slo * self.slo_queue_share)


@dataclass
class Grant:
    lease: Lease
    queue_seconds: float


@dataclass
class ModelInfo:
    name: str
    max_model_len: int = 0
    simulated: bool = False
    block_size: int = 0  # KV block size in tokens, from the first worker that reported one (0: none yet)
    block_size_warned: bool = False
    task: str = "generate"  # what its workers say it does: "generate" or "embed"
    embedding_dim: int = 0  # an embed model's vector length, from its workers (0: none yet)
    queue: FairQueue = field(default_factory=FairQueue)
    drain: DrainRate = field(default_factory=DrainRate)
    service: ServiceRate = field(default_factory=ServiceRate)


class Dispatcher:
    def __init__(self, policy: Policy, limits: Limits | None = None, *,
                 tenant_weights: Mapping[str, int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.limits = limits or Limits()
        self.tenant_weights = dict(tenant_weights or {})
        self.clock = clock
        self.workers: dict[str, WorkerCapacity] = {}
        self.models: dict[str, ModelInfo] = {}  # every model a worker ever served
        self.leases = LeaseTable()
        self._by_model: dict[str, list[WorkerCapacity]] = {}
        # Versioned models' split and canary analysis: fed from here, evaluated on its own tick.
        self.versions = VersionBook(ready=lambda served: bool(self._ready(served)))

    # ---- workers (fed by the WorkerPool) ----

    def worker(self, address: str) -> WorkerCapacity:
        w = self.workers.get(address)
        if w is None:
            w = self.workers[address] = WorkerCapacity(address, replica=self.leases.prefix)
        return w

    def expect_model(self, name: str) -> None:
        """A model the catalog lists: its queue and metrics exist (at zero) before any worker serves it, and a
        request for it while none does is a 503 (no worker now), not a 404 (no such model)."""
        self._model(name)

    def _model(self, name: str) -> ModelInfo:
        info = self.models.get(name)
        if info is None:
            info = self.models[name] = ModelInfo(name, queue=FairQueue(self.tenant_weights))
            metrics.precreate_model(name, self.policy.name)
        return info

    def _reindex(self) -> None:
        by_model: dict[str, list[WorkerCapacity]] = {}
        for w in self.workers.values():
            if w.model and w.state in (State.READY, State.DRAINING):
                by_model.setdefault(w.model, []).append(w)
        self._by_model = by_model

    def on_info(self, address: str, info: Any) -> None:
        w = self.worker(address)
        w.apply_info(info.worker_id, info.model, info.max_num_seqs, info.kv_capacity_tokens,
                     info.max_model_len, info.block_size, info.simulated, info.task, info.embedding_dim)
        self._learn_model(w)

    def _learn_model(self, w: WorkerCapacity) -> None:
        """What the model's workers say of it (context window, KV block size), from their Info and from
        every load report: an engine that was still starting at Info time reports them once it has."""
        m = self._model(w.model)
        m.max_model_len = max(m.max_model_len, w.max_model_len)
        m.simulated = m.simulated or w.simulated
        m.task = w.task
        m.embedding_dim = w.embedding_dim or m.embedding_dim
        if w.block_size and not m.block_size:
            m.block_size = w.block_size
        elif w.block_size and w.block_size != m.block_size and not m.block_size_warned:
            m.block_size_warned = True
            logger.warning("worker %s (%s) of %r reports KV block size %d, the model's first worker %d: prefix "
                           "hashes keep %d (reported once per model)", w.name, w.address, w.model,
                           w.block_size, m.block_size, m.block_size)

    def on_report(self, address: str, report: Any) -> None:
        w = self.worker(address)
        before = w.state
        started, ended = w.apply_report(report, self.clock())
        if report.results:
            self.versions.on_results(w.model, report.results)
        if w.model in self.versions.tracks:
            self.versions.on_mark(w.model, address, report.rollback)
        for lease_id in started:
            self.leases.mark_started(lease_id)
        for lease_id in ended:
            if self.leases.pop(lease_id) is not None:
                metrics.child(metrics.LEASES_ENDED, "finished").inc()
        if w.model:
            self._learn_model(w)
        if w.state is not before:
            self._reindex()
            logger.info("worker %s (%s) is %s", w.name, address, w.state.name.lower())
            if w.state is State.DRAINING:
                self._fail_if_unserved(w.model)
        metrics.observe_worker(w)
        self.dispatch(w.model)

    def on_lost(self, address: str, reason: str = "") -> None:
        """The worker's stream broke: exclude it at once and end its leases."""
        w = self.worker(address)  # a worker never reached is listed too, as unreachable
        if w.state is State.UNREACHABLE:
            return
        ids = w.lose()
        for lease_id in ids:
            if self.leases.pop(lease_id) is not None:
                metrics.child(metrics.LEASES_ENDED, "worker_lost").inc()
        self.versions.on_failures(w.model, "worker_lost", len(ids))
        self.policy.forget(address)
        self._reindex()
        metrics.observe_worker(w)
        logger.warning("worker %s (%s) unreachable: %s; %d leases ended", w.name, address, reason, len(ids))
        self._fail_if_unserved(w.model)

    def remove(self, address: str) -> None:
        """The worker left the configured set (DNS no longer lists it)."""
        if address in self.workers:
            self.on_lost(address, "removed")
            del self.workers[address]
            self._reindex()

    def _fail_if_unserved(self, model: str) -> None:
        if not model or self._ready(model):
            return
        m = self.models.get(model)
        if m is None:
            return
        for ticket in m.queue.drain():
            self._settle(ticket, Unavailable(f"no worker serves model {model!r} now"), "no_worker")
        m.service.busy(self.clock(), False)
        self._observe_depth(model)

    def _ready(self, model: str) -> list[WorkerCapacity]:
        return [w for w in self._by_model.get(model, ()) if w.state is State.READY]

    # ---- admission ----

    def _check(self, ticket: Ticket) -> None:
        if not ticket.model:
            raise InvalidRequest("model is required", param="model")
        if ticket.model not in self.models:
            raise NotFound(f"model {ticket.model!r} is not served by any worker", param="model")
        ready = [w for w in self._ready(ticket.model)
                 if w.address not in ticket.exclude and w.worker_id not in ticket.exclude]
        if not ready:
            excluded = " (the others are excluded)" if self._ready(ticket.model) else ""
            raise Unavailable(f"no worker serves model {ticket.model!r} now{excluded}")
        if not any(w.can_ever_fit(ticket.tokens, ticket.seqs, ticket.length) for w in ready):
            if not any(ticket.seqs <= w.max_num_seqs for w in ready):
                raise InvalidRequest(f"n ({ticket.seqs} sequences) exceeds what any worker of {ticket.model!r} "
                                     f"can run at once ({max(w.max_num_seqs for w in ready)})", param="n")
            if self.models[ticket.model].task == "embed":
                raise InvalidRequest(f"the inputs ({ticket.tokens} tokens) exceed what any worker of "
                                     f"{ticket.model!r} can hold", param="input")
            what = "prompt plus max_tokens" if ticket.seqs == 1 else f"prompt plus {ticket.seqs} x max_tokens"
            raise InvalidRequest(f"{what} ({ticket.tokens} tokens) exceeds what any worker "
                                 f"of {ticket.model!r} can hold", param="max_tokens")

    def place(self, ticket: Ticket) -> Lease | None:
        """Grants a lease now if a worker can hold the ticket, else None."""
        fitting = [w for w in self._by_model.get(ticket.model, ())
                   if w.fits(ticket.tokens, ticket.seqs) and w.address not in ticket.exclude
                   and w.worker_id not in ticket.exclude]
        if not fitting:
            return None
        worker, outcome = self.policy.choose(fitting, ticket)
        metrics.child(metrics.ROUTING, self.policy.name, outcome).inc()
        self.policy.routed(worker, ticket)
        lease = self.leases.grant(worker.address, worker.worker_id, ticket.tokens, self.clock(),
                                  self.limits.lease_ttl)
        worker.reserve(lease.lease_id, ticket.tokens, ticket.seqs)
        metrics.child(metrics.ADMITTED, ticket.model).inc()
        return lease

    async def admit(self, ticket: Ticket, timeout: float | None = None) -> Grant:
        """A lease for the ticket, waiting at most `timeout` (the caller's deadline) and the queue timeout.

        Refusals: `DeadlineExceeded` once the caller's deadline passes (on arrival or in the queue);
        `Overloaded` for a full queue or an SLO forecast and `QueueTimeout` for the queue timeout (or
        the SLO's budget), both with a `retry_after` hint from the queue's drain rate.
        """
        try:
            if self.versions.refuses(ticket.model, ticket.version_pinned):
                raise VersionRolledBack(f"the version {ticket.model!r} was rolled back; its model's stable "
                                        "version serves the request")
            self._check(ticket)
        except (InvalidRequest, NotFound, Unavailable) as exc:
            reason = {InvalidRequest: "invalid", NotFound: "unknown_model",
                      VersionRolledBack: "rolled_back"}.get(type(exc), "no_worker")
            metrics.child(metrics.REJECTED, reason).inc()
            raise
        if timeout is not None and timeout <= 0:  # refused at once, even with room
            metrics.child(metrics.REJECTED, "deadline").inc()
            raise DeadlineExceeded("the request's deadline passed before it reached the scheduler")
        budget = self.limits.budget()
        limit = self.limits.queue_timeout if budget is None else budget
        wait = limit if timeout is None else min(timeout, limit)
        model = self.models[ticket.model]
        now = self.clock()
        ticket.enqueued_at = now
        if not len(model.queue):
            lease = self.place(ticket)
            if lease is not None:
                metrics.child(metrics.QUEUE_TIME, ticket.model).observe(0.0)
                return Grant(lease, 0.0)
        if len(model.queue) >= self.limits.max_queue:
            metrics.child(metrics.REJECTED, "queue_full").inc()
            raise Overloaded(f"the admission queue of {ticket.model!r} is full ({len(model.queue)} waiting)",
                             retry_after=model.drain.retry_after(len(model.queue), now,
                                                                 ceiling=self.limits.queue_timeout))
        if budget is not None:
            self._forecast(model, ticket, budget, now)
        ticket.future = asyncio.get_running_loop().create_future()
        model.queue.push(ticket)
        model.service.busy(now, True)
        self._observe_depth(ticket.model, ticket.priority)
        self.dispatch(ticket.model)
        future = ticket.future
        try:
            await asyncio.wait((future,), timeout=wait)
        except asyncio.CancelledError:
            if not future.done():
                self._give_up(ticket, "cancelled")
            elif not future.cancelled() and future.exception() is None:
                self.release(future.result().lease.lease_id)  # granted as the caller left
            future.cancel()
            raise
        if future.done():
            grant: Grant = future.result()  # a grant, or the error that settled it
            return grant
        if timeout is not None and timeout < limit:
            reason = "deadline"
        elif budget is not None and budget < self.limits.queue_timeout:
            reason = "slo_budget"
        else:
            reason = "timeout"
        self._give_up(ticket, reason)
        future.cancel()
        if reason == "deadline":
            raise DeadlineExceeded(f"the request's deadline passed after {wait:.3g}s in the admission queue "
                                   f"of {ticket.model!r}")
        # Retry once the queue has moved past this ticket's place: those still waiting, and itself.
        retry_after = model.drain.retry_after(len(model.queue) + 1, self.clock(),
                                              ceiling=self.limits.queue_timeout)
        self.versions.on_failures(ticket.model, "timeout")
        if reason == "slo_budget":
            raise QueueTimeout(f"no worker had room within {wait:.3g}s, the admission queue's share of the "
                               f"{self.limits.ttft_slo:g}s TTFT SLO", retry_after=min(retry_after, wait))
        raise QueueTimeout(f"no worker had room within {wait:.3g}s (the queue timeout of {ticket.model!r})",
                           retry_after=retry_after)

    def _forecast(self, model: ModelInfo, ticket: Ticket, budget: float, now: float) -> None:
        """Refuses at once a ticket that would likely wait longer than the SLO's budget."""
        rate = model.service.rate(now)
        if rate is None or rate <= 0:
            return  # no history yet: let the budget decide
        expected = (model.queue.ahead(ticket.tenant, ticket.priority) + 1) / rate
        if expected <= budget:
            return
        metrics.child(metrics.REJECTED, "slo_forecast").inc()
        raise Overloaded(f"the admission queue of {ticket.model!r} moves at {rate:.3g} requests/s: the expected "
                         f"wait of {expected:.3g}s exceeds {budget:.3g}s, the queue's share of the "
                         f"{self.limits.ttft_slo:g}s TTFT SLO",
                         retry_after=min(self.limits.queue_timeout, max(0.05, expected - budget)))

    def _give_up(self, ticket: Ticket, reason: str) -> None:
        m = self.models[ticket.model]
        m.queue.discard(ticket)
        if not len(m.queue):
            m.service.busy(self.clock(), False)
        self._observe_depth(ticket.model, ticket.priority)
        metrics.child(metrics.REJECTED, reason).inc()

    def dispatch(self, model_name: str) -> None:
        """Grants leases to waiting tickets, in queue order, while the head fits somewhere."""
        m = self.models.get(model_name)
        if m is None or not len(m.queue):
            return
        queue = m.queue
        served = False
        while (ticket := queue.peek()) is not None:
            lease = self.place(ticket)
            if lease is None:
                break
            queue.pop()
            served = True
            now = self.clock()
            m.drain.record(now)
            m.service.record(now)
            waited = now - ticket.enqueued_at
            metrics.child(metrics.QUEUE_TIME, model_name).observe(waited)
            assert ticket.future is not None
            ticket.future.set_result(Grant(lease, waited))
        if served:
            if not len(queue):
                m.service.busy(self.clock(), False)
            self._observe_depth(model_name)

    def _settle(self, ticket: Ticket, exc: Exception, reason: str) -> None:
        if ticket.future is not None and not ticket.future.done():
            metrics.child(metrics.REJECTED, reason).inc()
            ticket.future.set_exception(exc)

    def _observe_depth(self, model_name: str, priority: int | None = None) -> None:
        m = self.models.get(model_name)
        if m is None:
            return
        levels = [priority_level(priority)] if priority is not None else list(PRIORITY_NAMES)
        for level in levels:
            metrics.child(metrics.QUEUE_DEPTH, model_name, PRIORITY_NAMES[level]).set(m.queue.depth(level))

    # ---- leases ----

    def release(self, lease_id: str, how: str = "released") -> bool:
        lease = self.leases.pop(lease_id)
        if lease is None:
            return False
        w = self.workers.get(lease.address)
        if w is not None and w.unreserve(lease_id):
            if how == "worker_failed":
                w.refused = True  # refused before it started: wait for the worker's next report
            self.dispatch(w.model)
        metrics.child(metrics.LEASES_ENDED, how).inc()
        return True

    def expire(self) -> int:
        """Ends the leases nobody claimed in time; returns how many."""
        expired = self.leases.pop_expired(self.clock())
        models = set()
        for lease in expired:
            w = self.workers.get(lease.address)
            if w is not None and w.unreserve(lease.lease_id):
                models.add(w.model)
            metrics.child(metrics.LEASES_ENDED, "expired").inc()
        for model in models:
            self.dispatch(model)
        if expired:
            logger.info("%d leases expired unclaimed", len(expired))
        return len(expired)

    def pending_leases(self, address: str) -> int:
        w = self.workers.get(address)
        return len(w.pending) if w else 0
