"""Capacity accounting without gRPC: never overcommit a worker (property-based)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from infermesh.scheduler.admission import Ticket
from infermesh.scheduler.capacity import State, WorkerCapacity

from tests.scheduler.fakes import Clock, FakeWorker, dispatcher


def test_free_capacity_subtracts_pending_leases_until_reported() -> None:
    d = dispatcher()
    w = FakeWorker(d, "a:1", max_num_seqs=4, kv_capacity_tokens=1000)
    cap = d.workers["a:1"]
    lease = d.place(Ticket(model="m", tokens=300))
    assert lease is not None
    assert (cap.free_seqs(), cap.free_tokens()) == (3, 700)
    w.report()  # the worker has not seen it yet: still pending
    assert (cap.free_seqs(), cap.free_tokens(), len(cap.pending)) == (3, 700, 1)
    w.start(lease.lease_id, 300)
    w.report()  # now the worker's own numbers hold it, and it is no longer pending
    assert (cap.free_seqs(), cap.free_tokens(), len(cap.pending)) == (3, 700, 0)
    w.finish(lease.lease_id)
    w.report()
    assert (cap.free_seqs(), cap.free_tokens()) == (4, 1000)
    assert lease.lease_id not in d.leases


def test_a_lease_in_the_active_snapshot_counts_as_started() -> None:
    cap = WorkerCapacity("a:1", max_num_seqs=2, kv_capacity_tokens=100, state=State.READY)
    cap.reserve("L1", 40)
    from infermesh.v1 import worker_pb2

    started, ended = cap.apply_report(worker_pb2.LoadReport(running=1, committed_tokens=40, max_num_seqs=2,
                                                            kv_capacity_tokens=100, leases_active=["L1"]))
    assert started == ["L1"] and ended == [] and cap.free_tokens() == 60
    # Missing from a later snapshot means it ended, even if its finish was not seen.
    started, ended = cap.apply_report(worker_pb2.LoadReport(max_num_seqs=2, kv_capacity_tokens=100))
    assert ended == ["L1"] and cap.free_tokens() == 100


def test_other_schedulers_load_is_respected() -> None:
    d = dispatcher()
    w = FakeWorker(d, "a:1", max_num_seqs=4, kv_capacity_tokens=1000)
    w.report(extra_running=3, extra_tokens=900)
    assert d.place(Ticket(model="m", tokens=200)) is None  # 100 tokens left
    lease = d.place(Ticket(model="m", tokens=100))
    assert lease is not None
    assert d.place(Ticket(model="m", tokens=1)) is None  # no sequence left


def test_draining_and_unreachable_workers_get_nothing() -> None:
    d = dispatcher()
    a = FakeWorker(d, "a:1")
    FakeWorker(d, "b:1")
    a.draining = True
    a.report()
    for _ in range(4):
        lease = d.place(Ticket(model="m", tokens=10))
        assert lease is not None and lease.address == "b:1"
    assert d.place(Ticket(model="m", tokens=10)) is None  # b is full; a drains
    d.on_lost("b:1", "test")
    assert d.place(Ticket(model="m", tokens=10)) is None
    assert d.workers["b:1"].state is State.UNREACHABLE and not d.workers["b:1"].pending


OPS = st.one_of(
    # prompt tokens, max_tokens, n (a request of n choices holds n sequences), excluded workers
    st.tuples(st.just("admit"), st.integers(1, 300), st.integers(1, 150), st.sampled_from([1, 1, 2, 3, 4]),
              st.sampled_from([(), ("a:1",), ("w-b:1",)])),
    st.tuples(st.just("start"), st.integers(0, 10_000)),
    st.tuples(st.just("finish"), st.integers(0, 10_000)),
    st.tuples(st.just("report"), st.sampled_from(["a:1", "b:1", "c:1"]), st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 10_000)),
    st.tuples(st.just("tick"), st.floats(0.0, 6.0)),
    st.tuples(st.just("drain"), st.sampled_from(["a:1", "b:1", "c:1"])),
    st.tuples(st.just("crash"), st.sampled_from(["a:1", "b:1", "c:1"])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, max_size=120), st.sampled_from(["least_load", "round_robin", "prefix_affinity"]),
       st.lists(st.tuples(st.integers(1, 6), st.integers(200, 2000), st.integers(0, 2)), min_size=3, max_size=3))
def test_never_overcommit(ops, policy, shapes) -> None:
    """Whatever happens, what a worker holds plus the leases outstanding on it fit its capacity."""
    clock = Clock()
    d = dispatcher(policy, clock, lease_ttl=10.0)
    workers = {}
    foreign = {}
    for address, (seqs, kv, other) in zip(["a:1", "b:1", "c:1"], shapes, strict=True):
        workers[address] = FakeWorker(d, address, max_num_seqs=seqs, kv_capacity_tokens=kv)
        foreign[address] = (min(other, seqs - 1), min(other * 50, kv // 2))  # another scheduler's steady load
        workers[address].report(extra_running=foreign[address][0], extra_tokens=foreign[address][1])
    granted = []  # (lease, tokens, seqs) handed to clients, in order

    def outstanding(lease):
        return lease.lease_id in d.leases and not d.leases.get(lease.lease_id).started

    for op in ops:
        kind = op[0]
        if kind == "admit":
            _, prompt, max_tokens, n, exclude = op
            tokens = prompt + n * max_tokens  # what the worker commits for it
            lease = d.place(Ticket(model="m", tokens=tokens, seqs=n, length=prompt + max_tokens,
                                   exclude=frozenset(exclude)))
            if lease is not None:
                w = d.workers[lease.address]
                assert w.address not in exclude and w.worker_id not in exclude
                assert not workers[lease.address].draining
                granted.append((lease, tokens, n))
        elif kind in ("start", "release") and granted:
            lease, tokens, n = granted[op[1] % len(granted)]
            if outstanding(lease) and lease.lease_id not in workers[lease.address].held:
                if kind == "start":
                    workers[lease.address].start(lease.lease_id, tokens, n)
                else:
                    assert d.release(lease.lease_id)
        elif kind == "finish" and granted:
            lease = granted[op[1] % len(granted)][0]
            workers[lease.address].finish(lease.lease_id)
        elif kind == "report":
            # A lagging engine has not counted our newest sequences; the worker lists every lease it holds.
            others = [f"other-{i}" for i in range(foreign[op[1]][0])] if op[2] else []
            workers[op[1]].report(extra_running=foreign[op[1]][0], extra_tokens=foreign[op[1]][1],
                                  engine_lags=op[2], active=others)
        elif kind == "tick":
            clock.now += op[1]
            d.expire()
        elif kind == "drain":
            workers[op[1]].draining = not workers[op[1]].draining
            workers[op[1]].report(extra_running=foreign[op[1]][0], extra_tokens=foreign[op[1]][1])
        elif kind == "crash":
            d.on_lost(op[1], "crash")
            workers[op[1]].held.clear()
            workers[op[1]].seqs.clear()
            workers[op[1]].started.clear()
            workers[op[1]].finished.clear()
        for address, fw in workers.items():
            mine = [(tokens, n) for lease, tokens, n in granted
                    if lease.address == address and outstanding(lease) and lease.lease_id not in fw.held]
            seqs = fw.held_seqs() + foreign[address][0] + sum(n for _, n in mine)
            tokens = sum(fw.held.values()) + foreign[address][1] + sum(t for t, _ in mine)
            assert seqs <= fw.max_num_seqs, (address, seqs)
            assert tokens <= fw.kv_capacity_tokens, (address, tokens)


def test_two_replicas_split_a_shared_worker_instead_of_racing_for_it() -> None:
    from infermesh.v1 import worker_pb2

    one, two = dispatcher(), dispatcher()
    held: dict[str, int] = {}

    def report() -> None:
        msg = worker_pb2.LoadReport(worker_id="w", model="m", running=len(held), max_num_seqs=4,
                                    kv_capacity_tokens=1000, committed_tokens=sum(held.values()),
                                    leases_active=list(held))
        for d in (one, two):
            d.on_report("w:1", msg)

    for d in (one, two):
        d.on_info("w:1", worker_pb2.WorkerInfo(worker_id="w", model="m", max_num_seqs=4, kv_capacity_tokens=1000))
    report()
    first = [one.place(Ticket(model="m", tokens=100)), two.place(Ticket(model="m", tokens=100))]
    for lease in first:
        held[lease.lease_id] = 100
    report()  # both replicas now see each other on the worker: 2 of 4 sequences each
    assert (one.workers["w:1"].replicas, two.workers["w:1"].replicas) == (2, 2)
    grants = []
    for _ in range(3):  # with stale reports, each takes only its own half
        grants += [x for x in (one.place(Ticket(model="m", tokens=100)), two.place(Ticket(model="m", tokens=100)))
                   if x is not None]
    assert len(grants) == 2 and len(held) + len(grants) == 4
    # Tokens are shared the same way: 500 each.
    for lease in grants:
        held[lease.lease_id] = 100
    held.pop(first[0].lease_id)
    report()
    assert one.place(Ticket(model="m", tokens=450)) is None  # its half has 400 left
    assert one.place(Ticket(model="m", tokens=300)) is not None
