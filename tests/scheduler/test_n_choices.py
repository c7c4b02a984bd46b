"""Requests of n choices: a lease holds n sequences and prompt + n * max_tokens, as the worker commits."""

from __future__ import annotations

import pytest
from infermesh.common.errors import InvalidRequest
from infermesh.scheduler.admission import Ticket
from infermesh.scheduler.service import ticket_from
from infermesh.v1 import scheduler_pb2

from tests.scheduler.fakes import FakeWorker, dispatcher


def test_admit_request_n_becomes_sequences_and_the_tokens_the_worker_commits() -> None:
    t = ticket_from(scheduler_pb2.AdmitRequest(model="m", prompt_tokens=10, max_tokens=20, n=3))
    assert (t.seqs, t.tokens, t.length) == (3, 10 + 3 * 20, 30)
    t = ticket_from(scheduler_pb2.AdmitRequest(model="m", prompt_tokens=10, max_tokens=20))  # unset: 1
    assert (t.seqs, t.tokens, t.length) == (1, 30, 30)
    with pytest.raises(InvalidRequest, match="implausibly large"):
        ticket_from(scheduler_pb2.AdmitRequest(model="m", prompt_tokens=10, max_tokens=1 << 20, n=64))


def test_a_lease_of_n_choices_reserves_n_sequences_and_all_their_tokens() -> None:
    d = dispatcher()
    w = FakeWorker(d, "a:1", max_num_seqs=4, kv_capacity_tokens=1000)
    cap = d.workers["a:1"]
    lease = d.place(Ticket(model="m", tokens=100 + 3 * 50, seqs=3, length=150))
    assert lease is not None
    assert (cap.free_seqs(), cap.free_tokens(), cap.load()) == (1, 750, 3)
    assert d.place(Ticket(model="m", tokens=20, seqs=2)) is None  # one sequence left
    w.start(lease.lease_id, 250, 3)
    w.report(engine_lags=True)  # the worker lists the lease; its engine has not counted the sequences yet
    assert not cap.pending and (cap.free_seqs(), cap.free_tokens()) == (1, 750)
    assert d.place(Ticket(model="m", tokens=20, seqs=2)) is None
    w.report()  # the engine counts them now
    assert (cap.free_seqs(), cap.free_tokens()) == (1, 750)
    assert d.place(Ticket(model="m", tokens=20, seqs=1)) is not None
    w.finish(lease.lease_id)
    w.report()
    assert (cap.free_seqs(), cap.free_tokens()) == (3, 980)


def test_released_and_lost_leases_of_n_choices_give_back_every_sequence() -> None:
    d = dispatcher()
    FakeWorker(d, "a:1", max_num_seqs=4, kv_capacity_tokens=1000)
    cap = d.workers["a:1"]
    lease = d.place(Ticket(model="m", tokens=400, seqs=4))
    assert lease is not None and cap.free_seqs() == 0
    assert d.release(lease.lease_id)
    assert (cap.free_seqs(), cap.free_tokens()) == (4, 1000)
    assert d.place(Ticket(model="m", tokens=400, seqs=4)) is not None
    d.on_lost("a:1", "test")
    assert (cap.pending_seqs, cap.pending_tokens) == (0, 0)


def test_the_per_sequence_length_not_the_total_meets_max_model_len() -> None:
    d = dispatcher()
    FakeWorker(d, "a:1", max_num_seqs=4, kv_capacity_tokens=2000, max_model_len=500)
    # 4 choices of 100 + 300 tokens: 1300 KV tokens, no sequence longer than 400.
    assert d.place(Ticket(model="m", tokens=100 + 4 * 300, seqs=4, length=400)) is not None


async def test_n_beyond_every_workers_sequences_is_invalid() -> None:
    d = dispatcher()
    FakeWorker(d, "a:1", max_num_seqs=4)
    FakeWorker(d, "b:1", max_num_seqs=2)
    grant = await d.admit(Ticket(model="m", tokens=100, seqs=4))
    assert grant.lease.address == "a:1"
    with pytest.raises(InvalidRequest, match=r"n \(5 sequences\) exceeds .* \(4\)") as err:
        await d.admit(Ticket(model="m", tokens=100, seqs=5))
    assert err.value.param == "n"
    with pytest.raises(InvalidRequest, match=r"prompt plus 3 x max_tokens \(1300 tokens\) exceeds") as err:
        await d.admit(Ticket(model="m", tokens=1300, seqs=3, length=500))
    assert err.value.param == "max_tokens"
