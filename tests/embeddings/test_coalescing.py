"""Concurrent embeddings requests coalesced into one admission and one worker call (request/embed_batch.py),
over the fake tiers: each caller's own vectors, usage and errors; tenants and priorities apart; callers that
go away or time out leave the others' work alone; no request waits for another's call."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from infermesh.common.errors import ContextLengthExceeded, DeadlineExceeded, InvalidRequest, Overloaded
from infermesh.frontend.request import embed_batch
from infermesh.frontend.request.embedding import EmbedParams, EmbedResult, embed
from infermesh.gpu_worker.sim_engine import sim_vector
from infermesh.v1 import scheduler_pb2

from tests.embeddings.fakes import DIM, MODEL, FakeEmbedBackends, Hold


@pytest.fixture
def fake(minilm_dir: Path) -> FakeEmbedBackends:
    return FakeEmbedBackends(minilm_dir)


def params(i: int = 0, **kwargs: object) -> EmbedParams:
    return EmbedParams(**{"model": MODEL, "request_id": f"r{i}", "tenant": "t", **kwargs})  # type: ignore[arg-type]


def texts_of(i: int, count: int = 1) -> list[str]:
    return [f"request {i} sentence {k}: the cat sat on mat number {i * 10 + k}." for k in range(count)]


def assert_own(fake: FakeEmbedBackends, texts: list[str], result: EmbedResult) -> None:
    ids = [fake.ids(t) for t in texts]
    assert [list(v) for v in result.vectors] == [pytest.approx(sim_vector(i, DIM), abs=1e-7) for i in ids]
    assert result.prompt_tokens == sum(map(len, ids))


async def test_requests_that_arrive_together_share_one_lease_and_each_gets_its_own_vectors(
        fake: FakeEmbedBackends) -> None:
    fake.admissions.append("a:1")
    fake.script("a:1", None)
    bodies = [texts_of(i, count=1 + i % 3) for i in range(5)]
    results = await asyncio.gather(*(embed(fake, params(i), texts=b) for i, b in enumerate(bodies)))
    (admit,) = fake.admitted
    (_, call), = fake.calls
    sent = [list(x.ids) for x in call.inputs]
    assert sent == [fake.ids(t) for b in bodies for t in b]  # every request's inputs, in order
    assert admit.prompt_tokens == sum(map(len, sent)) and admit.n == 1 and admit.max_tokens == 0
    assert admit.context.tenant == "t" and admit.context.request_id == "r0"
    for body, result in zip(bodies, results, strict=True):
        assert_own(fake, body, result)
    assert fake.released == []


async def test_tenants_and_priorities_are_never_mixed_in_a_batch(fake: FakeEmbedBackends) -> None:
    groups = [("alice", 0), ("bob", 0), ("alice", 2)]
    fake.admissions.extend(["a:1"] * len(groups))
    fake.script("a:1", *[None] * len(groups))
    calls = []
    for i in range(6):
        tenant, priority = groups[i % len(groups)]
        calls.append(embed(fake, params(i, tenant=tenant, priority=priority), texts=texts_of(i)))
    results = await asyncio.gather(*calls)
    admitted = sorted((a.context.tenant, a.context.priority, a.prompt_tokens) for a in fake.admitted)
    assert [(t, p) for t, p, _ in admitted] == sorted(groups)  # one admission per tenant and priority
    by_lease = {c.lease_id: [list(x.ids) for x in c.inputs] for _, c in fake.calls}
    for admit in fake.admitted:
        mine = [i for i in range(6) if groups[i % len(groups)] == (admit.context.tenant, admit.context.priority)]
        (inputs,) = [v for _, c in fake.calls for v in [by_lease[c.lease_id]]
                     if c.context.tenant == admit.context.tenant and c.context.priority == admit.context.priority]
        assert inputs == [fake.ids(texts_of(i)[0]) for i in mine]
    for i, result in enumerate(results):
        assert_own(fake, texts_of(i), result)


async def test_a_bad_request_fails_alone_before_it_joins(fake: FakeEmbedBackends) -> None:
    fake.admissions.append("a:1")
    fake.script("a:1", None)
    long = "the quick brown fox jumps over the lazy dog " * 40  # ~362 tokens, the window is 256
    good, empty, too_long, good2 = await asyncio.gather(
        embed(fake, params(0), texts=texts_of(0)), embed(fake, params(1), texts=[""]),
        embed(fake, params(2), texts=[long]), embed(fake, params(3), texts=texts_of(3)), return_exceptions=True)
    assert isinstance(empty, InvalidRequest) and empty.param == "input"
    assert isinstance(too_long, ContextLengthExceeded) and too_long.param == "input"
    assert isinstance(good, EmbedResult) and isinstance(good2, EmbedResult)
    assert_own(fake, texts_of(0), good)
    assert_own(fake, texts_of(3), good2)
    assert len(fake.admitted) == 1 and len(fake.calls[0][1].inputs) == 2


async def test_a_batch_the_worker_refuses_as_a_bad_request_is_split_so_only_the_bad_one_fails(
        fake: FakeEmbedBackends) -> None:
    fake.admissions.extend(["a:1"] * 4)
    # The batch, then each of its three requests alone (in order): the second is the bad one.
    fake.script("a:1", InvalidRequest("inputs[1]: token id 99999 is outside the vocabulary", param="inputs"),
                None, InvalidRequest("inputs: token id 99999 is outside the vocabulary", param="inputs"), None)
    results = await asyncio.gather(*(embed(fake, params(i), texts=texts_of(i)) for i in range(3)),
                                   return_exceptions=True)
    assert isinstance(results[1], InvalidRequest)
    for i in (0, 2):
        result = results[i]
        assert isinstance(result, EmbedResult)
        assert_own(fake, texts_of(i), result)
    assert [len(c.inputs) for _, c in fake.calls] == [3, 1, 1, 1]
    assert [o for _, o in fake.released] == [scheduler_pb2.LEASE_OUTCOME_CANCELLED] * 2  # the refused calls


async def test_the_queue_s_429_is_every_member_s_with_its_retry_after(fake: FakeEmbedBackends) -> None:
    fake.admissions.append(Overloaded("the admission queue is full", retry_after=3))
    results = await asyncio.gather(*(embed(fake, params(i), texts=texts_of(i)) for i in range(3)),
                                   return_exceptions=True)
    assert len(fake.admitted) == 1 and fake.calls == []
    for result in results:
        assert isinstance(result, Overloaded) and result.retry_after == 3


async def test_a_caller_that_goes_away_leaves_the_others_work_alone(fake: FakeEmbedBackends) -> None:
    hold = Hold()
    fake.admissions.append("a:1")
    fake.script("a:1", hold)
    tasks = [asyncio.ensure_future(embed(fake, params(i), texts=texts_of(i))) for i in range(3)]
    await hold.reached.wait()
    tasks[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    hold.release.set()
    for i in (0, 2):
        assert_own(fake, texts_of(i), await tasks[i])
    assert len(fake.calls) == 1 and fake.released == []  # the worker ran the batch: its report ends the lease


async def test_when_every_caller_has_gone_the_batch_is_cancelled_and_its_lease_released(
        fake: FakeEmbedBackends) -> None:
    hold = Hold()
    fake.admissions.append("a:1")
    fake.script("a:1", hold)
    tasks = [asyncio.ensure_future(embed(fake, params(i), texts=texts_of(i))) for i in range(2)]
    await hold.reached.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert fake.released == [("lease-1", scheduler_pb2.LEASE_OUTCOME_CANCELLED)]


async def test_a_caller_that_goes_away_before_the_batch_leaves_takes_its_inputs_out(
        fake: FakeEmbedBackends) -> None:
    fake.admissions.append("a:1")
    fake.script("a:1", None)
    tasks = [asyncio.ensure_future(embed(fake, params(i), texts=texts_of(i))) for i in range(3)]
    await asyncio.sleep(0)  # each request has run up to its join (nothing in it waits on anything else)
    assert fake.admitted == []
    tasks[0].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert [list(x.ids) for x in fake.calls[0][1].inputs] == [fake.ids(texts_of(i)[0]) for i in (1, 2)]


async def test_each_member_ends_at_its_own_deadline_and_the_batch_at_the_latest(fake: FakeEmbedBackends) -> None:
    hold = Hold()
    fake.admissions.append("a:1")
    fake.script("a:1", hold)
    hurried = asyncio.ensure_future(embed(fake, params(0, deadline=time.time() + 0.3), texts=texts_of(0)))
    patient = asyncio.ensure_future(embed(fake, params(1), texts=texts_of(1)))
    await hold.reached.wait()
    assert not fake.admitted[0].context.HasField("deadline")  # the patient member has none
    with pytest.raises(DeadlineExceeded):
        await hurried
    assert not patient.done()
    hold.release.set()
    assert_own(fake, texts_of(1), await patient)


async def test_a_request_never_waits_for_another_s_call(fake: FakeEmbedBackends) -> None:
    hold = Hold()
    fake.admissions.extend(["a:1", "a:1"])
    fake.script("a:1", hold, None)
    first = asyncio.ensure_future(embed(fake, params(0), texts=texts_of(0)))
    await hold.reached.wait()
    second = await embed(fake, params(1), texts=texts_of(1))  # served while the first is still in the worker
    assert_own(fake, texts_of(1), second)
    assert not first.done() and len(fake.admitted) == 2
    hold.release.set()
    assert_own(fake, texts_of(0), await first)


async def test_a_batch_is_bounded_by_inputs_and_tokens(fake: FakeEmbedBackends,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed_batch, "MAX_INPUTS", 4)
    fake.admissions.extend(["a:1"] * 8)
    fake.script("a:1", *[None] * 8)
    sizes = [1, 2, 1, 3, 1, 5, 1]
    bodies = [texts_of(i, count=n) for i, n in enumerate(sizes)]
    results = await asyncio.gather(*(embed(fake, params(i), texts=b) for i, b in enumerate(bodies)))
    # In arrival order; a request that does not fit starts the next batch, a larger one goes alone.
    assert [len(c.inputs) for _, c in fake.calls] == [4, 4, 5, 1]
    for body, result in zip(bodies, results, strict=True):
        assert_own(fake, body, result)
    monkeypatch.setattr(embed_batch, "MAX_INPUTS", 64)
    tokens = len(fake.ids(texts_of(0)[0]))
    monkeypatch.setattr(embed_batch, "MAX_TOKENS", 2 * tokens)
    fake.calls.clear()
    await asyncio.gather(*(embed(fake, params(i), texts=texts_of(0)) for i in range(3)))
    assert [len(c.inputs) for _, c in fake.calls] == [2, 1]
