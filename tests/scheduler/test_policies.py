"""Routing policies without gRPC: rotation, least load, prefix affinity and its imbalance guard."""

from __future__ import annotations

import collections

from infermesh.common.prefix import block_hashes
from infermesh.scheduler.admission import Ticket
from infermesh.scheduler.capacity import State, WorkerCapacity
from infermesh.scheduler.policies import LeastLoad, PrefixAffinity, PrefixIndex, RoundRobin

from tests.scheduler.fakes import FakeWorker, dispatcher


def cap(address: str, running: int = 0, seqs: int = 64) -> WorkerCapacity:
    return WorkerCapacity(address, worker_id=address, model="m", state=State.READY, max_num_seqs=seqs,
                          kv_capacity_tokens=100_000, running=running, held_seqs=running)


def prompt(system: int, user: int, system_len: int = 1000) -> list[int]:
    return [system * 7919 + i for i in range(system_len)] + [10_000_000 + user * 31 + i for i in range(40)]


def test_round_robin_rotates() -> None:
    ws = [cap("a"), cap("b"), cap("c")]
    rr = RoundRobin()
    assert [rr.choose(ws, ())[0].address for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_load_counts_pending_leases() -> None:
    a, b = cap("a", running=2), cap("b", running=1)
    b.reserve("x", 10)
    b.reserve("y", 10)  # b: 1 running + 2 promised = 3 > a's 2
    assert LeastLoad().choose([a, b], ())[0] is a


def test_prefix_index_matches_the_longest_cached_prefix() -> None:
    index = PrefixIndex(capacity_blocks=1000)
    hashes = block_hashes(prompt(1, 1))
    index.insert(hashes[:40])
    assert index.match(hashes) == 40
    assert index.match(block_hashes(prompt(2, 1))) == 0
    small = PrefixIndex(capacity_blocks=10)
    small.insert(hashes)
    assert len(small) == 10  # least recently used blocks were evicted, the chain's tail first
    assert small.match(hashes) == 10


def test_shared_prefixes_stick_to_one_worker_and_spread_across_workers() -> None:
    d = dispatcher("prefix_affinity")
    workers = [FakeWorker(d, f"w{i}:1", max_num_seqs=64, kv_capacity_tokens=1_000_000) for i in range(4)]
    assert len(workers) == 4
    homes: dict[int, set[str]] = collections.defaultdict(set)
    for n in range(200):
        system = n % 8
        hashes = block_hashes(prompt(system, n))
        lease = d.place(Ticket(model="m", tokens=1100, prefix_hashes=hashes))
        assert lease is not None
        homes[system].add(lease.address)
        d.release(lease.lease_id)  # keep the load even so the guard never fires
    assert all(len(h) == 1 for h in homes.values()), homes
    per_worker = collections.Counter(next(iter(h)) for h in homes.values())
    assert sorted(per_worker.values()) == [2, 2, 2, 2]  # 8 prefixes spread over 4 workers


def test_the_imbalance_guard_sends_work_to_the_least_loaded() -> None:
    policy = PrefixAffinity(balance_abs_threshold=4, balance_rel_threshold=1.5)
    hot, idle = cap("hot"), cap("idle")
    hashes = block_hashes(prompt(3, 0))
    policy.routed(hot, hashes)
    assert policy.choose([hot, idle], hashes) == (hot, "hit")
    hot.held_seqs = 4  # 4 more than idle: not beyond the absolute threshold
    assert policy.choose([hot, idle], hashes) == (hot, "hit")
    hot.held_seqs = 5
    assert policy.choose([hot, idle], hashes) == (idle, "imbalanced")
    idle.held_seqs = 4  # 5 vs 4: beyond neither threshold
    assert policy.choose([hot, idle], hashes) == (hot, "hit")
    hot.held_seqs, idle.held_seqs = 30, 25  # 5 more, but only 1.2x
    assert policy.choose([hot, idle], hashes) == (hot, "hit")


def test_no_prefix_or_no_match_goes_to_the_least_loaded() -> None:
    policy = PrefixAffinity()
    a, b = cap("a", running=3), cap("b", running=1)
    assert policy.choose([a, b], ()) == (b, "no_prefix")
    assert policy.choose([a, b], block_hashes(prompt(5, 0))) == (b, "miss")


def test_a_lost_worker_forgets_its_cache() -> None:
    d = dispatcher("prefix_affinity")
    FakeWorker(d, "a:1", max_num_seqs=64, kv_capacity_tokens=100_000)
    b = FakeWorker(d, "b:1", max_num_seqs=64, kv_capacity_tokens=100_000)
    hashes = block_hashes(prompt(1, 0))
    first = d.place(Ticket(model="m", tokens=1100, prefix_hashes=hashes))
    assert first is not None
    d.release(first.lease_id)
    d.on_lost(first.address, "test")
    other = "b:1" if first.address == "a:1" else "a:1"
    assert d.place(Ticket(model="m", tokens=1100, prefix_hashes=hashes)).address == other
    if first.address == "b:1":
        b.report()
    else:
        FakeWorker(d, "a:1", max_num_seqs=64, kv_capacity_tokens=100_000)
    # Back, but with an empty index: the prefix now lives on the other worker.
    assert d.place(Ticket(model="m", tokens=1100, prefix_hashes=hashes)).address == other


def test_a_chain_missing_its_first_block_matches_nothing() -> None:
    index = PrefixIndex(capacity_blocks=1000)
    hashes = block_hashes(prompt(1, 1))
    index.insert(hashes[1:])  # as after an LRU evicted the chain's head
    assert index.match(hashes) == 0
    index.insert(hashes[:1])
    assert index.match(hashes) == len(hashes)
