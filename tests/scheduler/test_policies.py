"""Routing policies without gRPC: rotation, least load, prefix affinity and its imbalance guard."""

from __future__ import annotations

import collections
from collections.abc import Sequence

from infermesh.common.prefix import block_hashes, cache_salt
from infermesh.scheduler.admission import Ticket
from infermesh.scheduler.capacity import State, WorkerCapacity
from infermesh.scheduler.dispatcher import Dispatcher
from infermesh.scheduler.policies import LeastLoad, PrefixAffinity, RoundRobin
from infermesh.v1 import common_pb2

from tests.scheduler.fakes import Clock, FakeWorker, dispatcher


def cap(address: str, running: int = 0, seqs: int = 64) -> WorkerCapacity:
    return WorkerCapacity(address, worker_id=address, model="m", state=State.READY, max_num_seqs=seqs,
                          kv_capacity_tokens=100_000, running=running, held_seqs=running)


def prompt(system: int, user: int, system_len: int = 1000) -> list[int]:
    return [system * 7919 + i for i in range(system_len)] + [10_000_000 + user * 31 + i for i in range(40)]


def hashes_of(ids: list[int], block_size: int = 16) -> list[int]:
    """As the frontend hashes a prompt for model "m"."""
    return block_hashes(ids, block_size, cache_salt("m"))


def ticket(hashes: Sequence[int] = ()) -> Ticket:
    return Ticket(model="m", tokens=1100, prefix_hashes=hashes)


def test_round_robin_rotates() -> None:
    ws = [cap("a"), cap("b"), cap("c")]
    rr = RoundRobin()
    assert [rr.choose(ws, ticket())[0].address for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_load_counts_pending_leases() -> None:
    a, b = cap("a", running=2), cap("b", running=1)
    b.reserve("x", 10)
    b.reserve("y", 10)  # b: 1 running + 2 promised = 3 > a's 2
    assert LeastLoad().choose([a, b], ticket())[0] is a


def test_shared_prefixes_stick_to_one_worker_and_spread_across_workers() -> None:
    d = dispatcher("prefix_affinity")
    workers = [FakeWorker(d, f"w{i}:1", max_num_seqs=64, kv_capacity_tokens=1_000_000) for i in range(4)]
    assert len(workers) == 4
    homes: dict[int, set[str]] = collections.defaultdict(set)
    for n in range(200):
        system = n % 8
        lease = d.place(ticket(hashes_of(prompt(system, n))))
        assert lease is not None
        homes[system].add(lease.address)
        d.release(lease.lease_id)  # keep the load even so the guard never fires
    assert all(len(h) == 1 for h in homes.values()), homes
    per_worker = collections.Counter(next(iter(h)) for h in homes.values())
    assert sorted(per_worker.values()) == [2, 2, 2, 2]  # 8 prefixes spread over 4 workers


def test_the_imbalance_guard_sends_work_to_the_least_loaded() -> None:
    policy = PrefixAffinity(balance_abs_threshold=4, balance_rel_threshold=1.5)
    hot, idle = cap("hot"), cap("idle")
    t = ticket(hashes_of(prompt(3, 0)))
    policy.routed(hot, t)
    assert policy.choose([hot, idle], t) == (hot, "hit")
    hot.held_seqs = 4  # 4 more than idle: not beyond the absolute threshold
    assert policy.choose([hot, idle], t) == (hot, "hit")
    hot.held_seqs = 5
    assert policy.choose([hot, idle], t) == (idle, "imbalanced")
    idle.held_seqs = 4  # 5 vs 4: beyond neither threshold
    assert policy.choose([hot, idle], t) == (hot, "hit")
    hot.held_seqs, idle.held_seqs = 30, 25  # 5 more, but only 1.2x
    assert policy.choose([hot, idle], t) == (hot, "hit")


def test_no_prefix_or_no_match_goes_to_the_least_loaded() -> None:
    policy = PrefixAffinity()
    a, b = cap("a", running=3), cap("b", running=1)
    assert policy.choose([a, b], ticket()) == (b, "no_prefix")
    assert policy.choose([a, b], ticket(hashes_of(prompt(5, 0)))) == (b, "miss")


def test_a_lost_worker_forgets_its_cache() -> None:
    d = dispatcher("prefix_affinity")
    FakeWorker(d, "a:1", max_num_seqs=64, kv_capacity_tokens=100_000)
    b = FakeWorker(d, "b:1", max_num_seqs=64, kv_capacity_tokens=100_000)
    hashes = hashes_of(prompt(1, 0))
    first = d.place(ticket(hashes))
    assert first is not None
    d.release(first.lease_id)
    d.on_lost(first.address, "test")
    other = "b:1" if first.address == "a:1" else "a:1"
    assert d.place(ticket(hashes)).address == other
    if first.address == "b:1":
        b.report()
    else:
        FakeWorker(d, "a:1", max_num_seqs=64, kv_capacity_tokens=100_000)
    # Back, but with an empty index: the prefix now lives on the other worker.
    assert d.place(ticket(hashes)).address == other


def test_affinity_holds_at_block_size_32_when_frontend_and_index_agree() -> None:
    d = dispatcher("prefix_affinity")
    for i in range(3):
        FakeWorker(d, f"w{i}:1", max_num_seqs=64, kv_capacity_tokens=100_000, block_size=32)
    assert d.models["m"].block_size == 32
    block_size = d.models["m"].block_size  # what ListModels tells the frontend
    first = d.place(ticket(hashes_of(prompt(4, 0), block_size)))
    assert first is not None
    d.release(first.lease_id)
    again = d.place(ticket(hashes_of(prompt(4, 1), block_size)))  # same system prompt, another user turn
    assert again is not None and again.address == first.address
    # The same prompt hashed over 16-token blocks shares no hash with what the index holds.
    assert not set(hashes_of(prompt(4, 0), 16)) & set(hashes_of(prompt(4, 0), 32))


class Recording(RoundRobin):
    """Remembers what the dispatcher hands the policy."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.chosen: list[Ticket] = []
        self.routed_to: list[tuple[str, Ticket]] = []

    def choose(self, candidates: Sequence[WorkerCapacity], ticket: Ticket) -> tuple[WorkerCapacity, str]:
        self.chosen.append(ticket)
        return super().choose(candidates, ticket)

    def routed(self, worker: WorkerCapacity, ticket: Ticket) -> None:
        self.routed_to.append((worker.address, ticket))


def test_policies_get_the_whole_admission_ticket() -> None:
    policy = Recording()
    d = Dispatcher(policy, clock=Clock())
    FakeWorker(d, "a:1", max_num_seqs=64, kv_capacity_tokens=100_000)
    t = Ticket(model="m", tokens=1100, tenant="acme", priority=common_pb2.PRIORITY_HIGH,
               prefix_hashes=hashes_of(prompt(1, 0)))
    lease = d.place(t)
    assert lease is not None
    assert policy.chosen == [t] and policy.routed_to == [("a:1", t)]
    assert policy.chosen[0].tenant == "acme" and policy.chosen[0].priority == common_pb2.PRIORITY_HIGH


def test_a_constraint_goes_where_its_grammar_was_compiled() -> None:
    """Requests with one schema (one constraint hash) prefer the worker that compiled it: with no prefix
    cached, on an equal prefix, but never against the imbalance guard; a longer prefix still wins."""
    policy = PrefixAffinity(balance_abs_threshold=4, balance_rel_threshold=1.5)
    a, b = cap("a"), cap("b")
    schema = Ticket(model="m", tokens=1100, constraint_hash=42)
    first, outcome = policy.choose([a, b], schema)
    assert outcome == "no_prefix"
    policy.routed(first, schema)
    other = b if first is a else a
    first.running = first.held_seqs = 2  # busier, but within the guard
    assert policy.choose([a, b], schema) == (first, "grammar")
    assert policy.choose([a, b], Ticket(model="m", tokens=1100, constraint_hash=7))[0] is other  # another schema
    first.running = first.held_seqs = 20  # far busier: balanced away
    assert policy.choose([a, b], schema)[0] is other
    first.running = first.held_seqs = 0
    # A prefix cached on the other worker outweighs the grammar; an equal prefix is decided by the grammar.
    ids = hashes_of(prompt(1, 1))
    policy.routed(other, ticket(ids))
    with_prefix = Ticket(model="m", tokens=1100, prefix_hashes=ids, constraint_hash=42)
    assert policy.choose([a, b], with_prefix) == (other, "hit")
    policy.routed(first, ticket(ids))
    assert policy.choose([a, b], with_prefix) == (first, "hit")
    policy.forget(first.address)
    assert policy.choose([a, b], schema)[1] == "no_prefix"
