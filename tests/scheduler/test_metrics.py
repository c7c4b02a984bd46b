"""The scheduler's series exist at zero before their first event; undeclared label values are reported."""

from __future__ import annotations

import pytest
from infermesh.scheduler import metrics
from infermesh.scheduler.admission import PRIORITY_NAMES, Ticket
from infermesh.scheduler.policies import POLICIES
from prometheus_client import REGISTRY

from tests.scheduler.fakes import FakeWorker, dispatcher


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_unlabelled_by_model_families_exist_from_import() -> None:
    for reason in metrics.REJECT_REASONS:
        assert sample("infermesh_scheduler_rejected_total", reason=reason) is not None, reason
    for how in metrics.LEASE_ENDINGS:
        assert sample("infermesh_scheduler_leases_ended_total", how=how) is not None, how


def test_declared_values_match_help_and_policies() -> None:
    for reason in metrics.REJECT_REASONS:
        assert reason in metrics.REJECTED._documentation, reason
    for how in metrics.LEASE_ENDINGS:
        assert how in metrics.LEASES_ENDED._documentation, how
    assert set(metrics.ROUTING_OUTCOMES) == set(POLICIES)


def test_a_model_series_exist_once_a_worker_reports_it() -> None:
    d = dispatcher("round_robin")
    FakeWorker(d, "a:1", model="precreated")
    for priority in PRIORITY_NAMES.values():
        assert sample("infermesh_scheduler_queue_depth", model="precreated", priority=priority) == 0
    assert sample("infermesh_scheduler_admitted_total", model="precreated") == 0
    assert sample("infermesh_scheduler_queue_time_seconds_count", model="precreated") == 0
    assert sample("infermesh_scheduler_routing_decisions_total", policy="round_robin", outcome="rotation") \
        is not None


@pytest.mark.parametrize("policy", POLICIES)
def test_the_outcomes_a_policy_decides_are_declared(policy: str, caplog: pytest.LogCaptureFixture) -> None:
    d = dispatcher(policy)
    for i in range(2):
        FakeWorker(d, f"w:{i}")
    for prefix in ((), (1, 2), (1, 2), (3,)):
        assert d.place(Ticket(model="m", tokens=10, prefix_hashes=prefix)) is not None
    assert "not a declared label set" not in caplog.text


def test_an_undeclared_label_value_is_reported_and_still_counted(caplog: pytest.LogCaptureFixture) -> None:
    assert not metrics.declared(metrics.REJECTED, ("no_such_reason",))
    assert not metrics.declared(metrics.ROUTING, ("round_robin", "hit"))
    metrics.child(metrics.REJECTED, "no_such_reason").inc()
    assert "not a declared label set" in caplog.text
    assert sample("infermesh_scheduler_rejected_total", reason="no_such_reason") == 1
