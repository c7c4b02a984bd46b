"""The scheduler's Prometheus metrics (served on its metrics port).

Every family exists at zero before its first event, so that an alert or a KEDA
query reads 0 rather than "no data": the series without a model label from
import, a model's series (and the routing policy's outcomes) from the moment
a worker first reports the model (`precreate_model`). The label values each
family takes are listed here; `child` logs an error for any other (a new
reason must be listed, so that its series exists from start) and counts it.
"""

from __future__ import annotations

import logging
from typing import Any

from infermesh.common.metrics import LATENCY_BUCKETS
from infermesh.scheduler.admission import PRIORITY_NAMES
from infermesh.scheduler.capacity import WorkerCapacity
from prometheus_client import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

REJECT_REASONS = ("queue_full", "timeout", "deadline", "no_worker", "unknown_model", "too_large", "invalid",
                  "cancelled", "slo_budget", "slo_forecast", "rolled_back")
# The outcomes each policy of `infermesh.scheduler.policies` decides with (a policy not listed,
# such as a test's, has its series created as it first decides).
ROUTING_OUTCOMES: dict[str, tuple[str, ...]] = {
    "round_robin": ("rotation",),
    "least_load": ("least_loaded",),
    "prefix_affinity": ("no_prefix", "miss", "hit", "imbalanced", "grammar"),
}
LEASE_ENDINGS = ("finished", "released", "worker_failed", "expired", "worker_lost")

QUEUE_DEPTH = Gauge("infermesh_scheduler_queue_depth", "Requests waiting for a lease.",
                    ["model", "priority"])
ADMITTED = Counter("infermesh_scheduler_admitted_total", "Leases granted.", ["model"])
REJECTED = Counter("infermesh_scheduler_rejected_total",
                   "Admissions refused, by reason (queue_full, timeout, deadline, no_worker, "
                   "unknown_model, too_large, invalid, cancelled; rolled_back: a canary version rolled back "
                   "since the frontend split the request to it; with a TTFT SLO: slo_budget for a wait "
                   "past the SLO's share, slo_forecast for an expected wait too long, refused at once).",
                   ["reason"])
QUEUE_TIME = Histogram("infermesh_scheduler_queue_time_seconds",
                       "Time from arrival to grant (0 when a worker had room at once).", ["model"],
                       buckets=(0.0005,) + LATENCY_BUCKETS)
ROUTING = Counter("infermesh_scheduler_routing_decisions_total", "Routing decisions by policy and outcome.",
                  ["policy", "outcome"])
LEASES_ENDED = Counter("infermesh_scheduler_leases_ended_total",
                       f"Leases ended, by how ({', '.join(LEASE_ENDINGS)}).", ["how"])

# Versions of a versioned model (infermesh.scheduler.versions): `model` is the model's name, `version` the version's.
VERSION_OUTCOMES = ("ok", "failed", "timeout", "worker_lost")
ROLLBACK_REASONS = ("error_rate", "ttft", "tpot")
VERSION_REQUESTS = Counter("infermesh_scheduler_version_requests_total",
                           "Requests of a model's version that ended, by outcome (ok; failed: the engine failed it; "
                           "timeout: its deadline or the queue timeout; worker_lost: its worker's stream broke).",
                           ["model", "version", "outcome"])
VERSION_TTFT = Histogram("infermesh_scheduler_version_ttft_seconds",
                         "Time to first token of a version's requests, as its workers measured it.",
                         ["model", "version"], buckets=LATENCY_BUCKETS)
VERSION_TPOT = Histogram("infermesh_scheduler_version_tpot_seconds",
                         "Mean time per output token after the first of a version's requests.",
                         ["model", "version"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32,
                                                        0.64, 1.28))
VERSION_WEIGHT = Gauge("infermesh_scheduler_version_weight",
                       "Percent of a model's requests its version takes now (after rollout steps and rollbacks).",
                       ["model", "version"])
ROLLBACKS = Counter("infermesh_rollbacks_total",
                    "Canary versions rolled back, by reason (error_rate, ttft, tpot): each scheduler replica counts "
                    "every rollback it takes, decided itself or taken on from another replica's mark (alert on "
                    "max over replicas).", ["model", "version", "reason"])

_WORKER_LABELS = ["worker", "model"]
WORKER_STATE = Gauge("infermesh_scheduler_worker_state",
                     "Worker state: 0 connecting, 1 ready, 2 draining, 3 unreachable.", _WORKER_LABELS)
WORKER_RUNNING = Gauge("infermesh_scheduler_worker_running", "Sequences running (worker report).",
                       _WORKER_LABELS)
WORKER_WAITING = Gauge("infermesh_scheduler_worker_waiting", "Sequences waiting (worker report).",
                       _WORKER_LABELS)
WORKER_KV_USAGE = Gauge("infermesh_scheduler_worker_kv_cache_usage", "KV cache in use, 0..1 (worker report).",
                        _WORKER_LABELS)
WORKER_COMMITTED = Gauge("infermesh_scheduler_worker_committed_tokens",
                         "KV tokens committed (worker report).", _WORKER_LABELS)
WORKER_FREE_SEQS = Gauge("infermesh_scheduler_worker_free_seqs",
                         "Sequences free after this scheduler's pending leases.", _WORKER_LABELS)
WORKER_FREE_TOKENS = Gauge("infermesh_scheduler_worker_free_kv_tokens",
                           "KV tokens free after this scheduler's pending leases.", _WORKER_LABELS)
WORKER_PENDING = Gauge("infermesh_scheduler_worker_pending_leases",
                       "Leases granted on the worker that it has not reported yet.", _WORKER_LABELS)
WORKER_HIT_RATE = Gauge("infermesh_scheduler_worker_prefix_cache_hit_rate",
                        "Prefix-cache hit rate (worker report).", _WORKER_LABELS)


_WORKER_GAUGES = (WORKER_STATE, WORKER_RUNNING, WORKER_WAITING, WORKER_COMMITTED, WORKER_FREE_SEQS,
                  WORKER_FREE_TOKENS, WORKER_PENDING, WORKER_KV_USAGE, WORKER_HIT_RATE)
_worker_children: dict[tuple[str, str], tuple[Any, ...]] = {}


def observe_worker(worker: WorkerCapacity) -> None:
    """Sets the worker's gauges (on every load report: the labelled children are looked up once)."""
    labels = (worker.address, worker.model or "-")
    children = _worker_children.get(labels)
    if children is None:
        children = _worker_children[labels] = tuple(g.labels(*labels) for g in _WORKER_GAUGES)
    state, running, waiting, committed, free_seqs, free_tokens, pending, kv_usage, hit_rate = children
    state.set(int(worker.state))
    running.set(worker.running)
    waiting.set(worker.waiting)
    committed.set(worker.committed_tokens)
    free_seqs.set(max(0, worker.free_seqs()))
    free_tokens.set(max(0, worker.free_tokens()))
    pending.set(len(worker.pending))
    if worker.report is not None:
        kv_usage.set(worker.report.kv_cache_usage)
        hit_rate.set(worker.report.prefix_cache_hit_rate)


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once per label set (the hot paths call it per request).

    A label value not declared above is logged as an error (once) and counted all the same.
    """
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        if not declared(metric, labels):
            logger.error("%s is not a declared label set of %s: list it in %s", labels, metric._name, __name__)
        found = _children[key] = metric.labels(*labels)
    return found


_children: dict[tuple[int, tuple[str, ...]], object] = {}


def declared(metric: Any, labels: tuple[str, ...]) -> bool:
    if metric is REJECTED:
        return labels[0] in REJECT_REASONS
    if metric is LEASES_ENDED:
        return labels[0] in LEASE_ENDINGS
    if metric is ROUTING:
        policy, outcome = labels
        return policy not in ROUTING_OUTCOMES or outcome in ROUTING_OUTCOMES[policy]
    return True


def precreate_model(model: str, policy: str) -> None:
    """Creates a model's series at zero, and those of the routing policy's outcomes."""
    for priority in PRIORITY_NAMES.values():
        child(QUEUE_DEPTH, model, priority)
    child(ADMITTED, model)
    child(QUEUE_TIME, model)
    for outcome in ROUTING_OUTCOMES.get(policy, ()):
        child(ROUTING, policy, outcome)


for _reason in REJECT_REASONS:
    child(REJECTED, _reason)
for _how in LEASE_ENDINGS:
    child(LEASES_ENDED, _how)


def precreate_version(model: str, version: str) -> None:
    """A version's series at zero from the moment the catalog lists it."""
    for outcome in VERSION_OUTCOMES:
        VERSION_REQUESTS.labels(model=model, version=version, outcome=outcome)
    for reason in ROLLBACK_REASONS:
        ROLLBACKS.labels(model=model, version=version, reason=reason)
    VERSION_TTFT.labels(model=model, version=version)
    VERSION_TPOT.labels(model=model, version=version)
    VERSION_WEIGHT.labels(model=model, version=version)
