"""The admission queue without gRPC: priority order, tenant fairness, lazy removal, drain rate."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from infermesh.scheduler.admission import DrainRate, FairQueue, Ticket, priority_level
from infermesh.v1 import common_pb2

P = common_pb2


def t(tenant: str = "", priority: int = P.PRIORITY_NORMAL, tag: str = "") -> Ticket:
    return Ticket(model="m", tokens=1, tenant=tenant, priority=priority, request_id=tag)


def drain_tags(q: FairQueue) -> list[str]:
    return [ticket.request_id for ticket in q.drain()]


def test_unspecified_priority_is_normal() -> None:
    assert priority_level(P.PRIORITY_UNSPECIFIED) == P.PRIORITY_NORMAL
    assert priority_level(99) == P.PRIORITY_NORMAL
    q = FairQueue()
    q.push(t(priority=P.PRIORITY_LOW, tag="low"))
    q.push(t(priority=P.PRIORITY_UNSPECIFIED, tag="unspecified"))
    q.push(t(priority=P.PRIORITY_NORMAL, tag="normal"))
    assert q.depth(P.PRIORITY_NORMAL) == 2
    assert drain_tags(q) == ["unspecified", "normal", "low"]


def test_strict_priority_order() -> None:
    q = FairQueue()
    for prio, tag in [(P.PRIORITY_LOW, "l1"), (P.PRIORITY_NORMAL, "n1"), (P.PRIORITY_HIGH, "h1"),
                      (P.PRIORITY_CRITICAL, "c1"), (P.PRIORITY_HIGH, "h2"), (P.PRIORITY_LOW, "l2")]:
        q.push(t("a", prio, tag))
    assert len(q) == 6
    assert drain_tags(q) == ["c1", "h1", "h2", "n1", "l1", "l2"]
    assert len(q) == 0 and q.peek() is None


def test_a_burst_does_not_starve_another_tenant() -> None:
    q = FairQueue()
    for i in range(100):
        q.push(t("bursty", tag=f"b{i}"))
    q.push(t("quiet", tag="q0"))
    q.push(t("quiet", tag="q1"))
    order = drain_tags(q)
    # The quiet tenant's requests are served within the first few, not after 100.
    assert order.index("q0") <= 1 and order.index("q1") <= 3
    assert [x for x in order if x.startswith("b")] == [f"b{i}" for i in range(100)]  # FIFO per tenant


def test_weighted_round_robin() -> None:
    q = FairQueue({"gold": 3})
    for i in range(9):
        q.push(t("gold", tag=f"g{i}"))
        q.push(t("free", tag=f"f{i}"))
    first8 = drain_tags(q)[:8]
    assert first8 == ["g0", "g1", "g2", "f0", "g3", "g4", "g5", "f1"]


def test_discarded_tickets_are_skipped_and_not_counted() -> None:
    q = FairQueue()
    a, b, c = t("x", tag="a"), t("x", tag="b"), t("y", tag="c")
    for ticket in (a, b, c):
        q.push(ticket)
    q.discard(a)
    q.discard(a)  # idempotent
    assert len(q) == 2 and q.depth(P.PRIORITY_NORMAL) == 2
    assert q.peek() is b
    q.discard(c)
    assert drain_tags(q) == ["b"]
    assert len(q) == 0


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(
    [P.PRIORITY_CRITICAL, P.PRIORITY_HIGH, P.PRIORITY_NORMAL, P.PRIORITY_LOW]), st.booleans()), max_size=60))
def test_every_live_ticket_leaves_once_in_priority_order(items) -> None:
    q = FairQueue({"a": 2})
    tickets = []
    for i, (tenant, prio, dead) in enumerate(items):
        ticket = t(tenant, prio, str(i))
        q.push(ticket)
        tickets.append((ticket, dead))
    for ticket, dead in tickets:
        if dead:
            q.discard(ticket)
    live = [ticket for ticket, dead in tickets if not dead]
    assert len(q) == len(live)
    out = q.drain()
    assert sorted(id(x) for x in out) == sorted(id(x) for x in live)
    levels = [priority_level(x.priority) for x in out]
    assert levels == sorted(levels)
    for tenant in "abcd":  # FIFO within a tenant and priority
        for prio in (P.PRIORITY_CRITICAL, P.PRIORITY_HIGH, P.PRIORITY_NORMAL, P.PRIORITY_LOW):
            seq = [int(x.request_id) for x in out if x.tenant == tenant and x.priority == prio]
            assert seq == sorted(seq)


def test_retry_after_follows_the_drain_rate() -> None:
    rate = DrainRate(window=10)
    assert rate.retry_after(50, now=0.0, default=1.0) == 1.0  # nothing observed yet
    for i in range(10):
        rate.record(i * 0.1)  # 10 per second
    assert abs(rate.retry_after(50, now=0.9) - 5.0) < 0.01
    assert rate.retry_after(50, now=0.9, ceiling=2.0) == 2.0
    # A queue that stopped draining asks callers to wait longer.
    assert rate.retry_after(50, now=9.0, ceiling=100) > 40
