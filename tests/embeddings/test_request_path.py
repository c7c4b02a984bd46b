"""The embeddings' request path in-process (request/embedding.py), over fake tiers: admission, retries,
releases, the model's task, truncation, limits, and the endpoint's body parsing and response encoding."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from pathlib import Path

import pytest
from infermesh.common.errors import InvalidRequest, NotFound, Overloaded, Unavailable
from infermesh.common.limits import MAX_EMBED_INPUTS, MAX_EMBED_TOKENS, check_embed_inputs, embed_truncation
from infermesh.frontend import metrics
from infermesh.frontend.embeddings.protocol import EmbeddingRequest
from infermesh.frontend.embeddings.serving import base64_vector, response_body
from infermesh.frontend.openai.protocol import parse
from infermesh.frontend.request import embed_tokens
from infermesh.frontend.request.attempts import MAX_ATTEMPTS
from infermesh.frontend.request.embedding import EmbedParams, EmbedResult, embed, truncate_ids
from infermesh.gpu_worker.sim_engine import sim_vector
from infermesh.v1 import scheduler_pb2

from tests.embeddings.fakes import DIM, MODEL, FakeEmbedBackends, Hold

TEXTS = ["A cat sits on the mat.", "Quarterly revenue rose by 4%."]


@pytest.fixture
def fake(minilm_dir: Path) -> FakeEmbedBackends:
    return FakeEmbedBackends(minilm_dir)


def params(**kwargs: object) -> EmbedParams:
    return EmbedParams(**{"model": MODEL, "request_id": "r1", "tenant": "t", **kwargs})  # type: ignore[arg-type]


def retries(reason: str) -> float:
    return metrics.RETRIES.labels(reason=reason)._value.get()  # type: ignore[attr-defined, no-any-return]


async def test_admission_asks_one_sequence_of_the_inputs_tokens_and_no_output(fake: FakeEmbedBackends) -> None:
    fake.admissions.append("a:1")
    fake.script("a:1", None)
    result = await embed(fake, params(priority=2, deadline=None), texts=TEXTS)
    ids = [fake.ids(t) for t in TEXTS]
    (admit,) = fake.admitted
    assert admit.model == MODEL and admit.max_tokens == 0 and admit.n == 1
    assert admit.prompt_tokens == sum(map(len, ids)) == result.prompt_tokens
    assert admit.context.tenant == "t" and admit.context.priority == 2 and not admit.exclude_workers
    (address, call), = fake.calls
    assert address == "a:1" and call.lease_id == "lease-1"
    assert [list(i.ids) for i in call.inputs] == ids and ids[0][0] == 101 and ids[0][-1] == 102  # [CLS] .. [SEP]
    assert [list(v) for v in result.vectors] == [pytest.approx(sim_vector(i, DIM), abs=1e-7) for i in ids]
    assert fake.released == []  # the worker ran it: its load report ends the lease


async def test_a_worker_failure_retries_on_another_worker_and_releases_it_as_failed(
        fake: FakeEmbedBackends) -> None:
    fake.admissions.extend(["a:1", "b:2"])
    fake.script("a:1", Unavailable("the worker is draining"))
    fake.script("b:2", None)
    before = retries("UNAVAILABLE")
    result = await embed(fake, params(), texts=TEXTS)
    assert [a for a, _ in fake.calls] == ["a:1", "b:2"]
    assert list(fake.admitted[1].exclude_workers) == ["id-a:1", "a:1"]
    assert fake.released == [("lease-1", scheduler_pb2.LEASE_OUTCOME_WORKER_FAILED)]
    assert len(result.vectors) == 2 and retries("UNAVAILABLE") == before + 1


async def test_a_refusal_at_capacity_retries_too_and_gives_up_after_max_attempts(fake: FakeEmbedBackends) -> None:
    for i in range(MAX_ATTEMPTS):
        fake.admissions.append(f"w:{i}")
        fake.script(f"w:{i}", Overloaded("worker at capacity"))
    with pytest.raises(Unavailable, match=f"after {MAX_ATTEMPTS} attempts"):
        await embed(fake, params(), texts=TEXTS)
    assert len(fake.calls) == MAX_ATTEMPTS
    assert {o for _, o in fake.released} == {scheduler_pb2.LEASE_OUTCOME_WORKER_FAILED}


async def test_a_refusal_of_the_request_itself_is_not_retried(fake: FakeEmbedBackends) -> None:
    fake.admissions.append("a:1")
    fake.script("a:1", InvalidRequest("inputs: token id 99999 is outside the vocabulary"))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        await embed(fake, params(), texts=TEXTS)
    assert len(fake.admitted) == 1
    assert fake.released == [("lease-1", scheduler_pb2.LEASE_OUTCOME_CANCELLED)]


async def test_the_queue_s_429_reaches_the_caller_unchanged(fake: FakeEmbedBackends) -> None:
    fake.admissions.append(Overloaded("the admission queue is full", retry_after=3))
    with pytest.raises(Overloaded) as refused:
        await embed(fake, params(), texts=TEXTS)
    assert refused.value.retry_after == 3 and fake.calls == []


async def test_a_caller_that_goes_away_mid_call_releases_its_lease(fake: FakeEmbedBackends) -> None:
    hold = Hold()
    fake.admissions.append("a:1")
    fake.script("a:1", hold)
    task = asyncio.ensure_future(embed(fake, params(), texts=TEXTS))
    await hold.reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.released == [("lease-1", scheduler_pb2.LEASE_OUTCOME_CANCELLED)]


async def test_a_generate_model_is_a_400_naming_model(minilm_dir: Path) -> None:
    fake = FakeEmbedBackends(minilm_dir, task="generate")
    with pytest.raises(InvalidRequest, match="not embeddings") as refused:
        await embed(fake, params(), texts=TEXTS)
    assert refused.value.param == "model" and fake.admitted == [] and fake.encoded == []


async def test_no_worker_is_503_and_an_unknown_model_404(fake: FakeEmbedBackends) -> None:
    fake.facts.clear()
    with pytest.raises(Unavailable):
        await embed(fake, params(), texts=TEXTS)

    async def unknown(model: str) -> None:
        raise NotFound(f"The model {model!r} does not exist.", param="model")
    fake.tokenizer_model = unknown  # type: ignore[assignment, method-assign]
    with pytest.raises(NotFound) as refused:
        await embed(fake, params(), texts=TEXTS)
    assert refused.value.param == "model" and fake.admitted == []


@pytest.mark.parametrize("dimensions, ok", [(0, True), (DIM, True), (128, False), (DIM + 1, False)])
async def test_dimensions_must_be_the_model_s_own(fake: FakeEmbedBackends, dimensions: int, ok: bool) -> None:
    fake.admissions.append("a:1")
    fake.script("a:1", None)
    if ok:
        await embed(fake, params(dimensions=dimensions), texts=TEXTS)
        assert fake.calls[0][1].dimensions == dimensions
        return
    with pytest.raises(InvalidRequest, match="Matryoshka") as refused:
        await embed(fake, params(dimensions=dimensions), texts=TEXTS)
    assert refused.value.param == "dimensions" and fake.admitted == []


@pytest.mark.parametrize("texts, ids, match", [
    ([], None, "must not be empty"),
    ([""], None, "the input is an empty string"),
    (["a", ""], None, r"input\[1\] is an empty string"),
    (None, [[]], "must not be empty"),
    (None, [[101, 30522]], "outside the vocabulary"),
    (["word"] * (MAX_EMBED_INPUTS + 1), None, f"at most {MAX_EMBED_INPUTS} inputs"),
    (["word " * 300], None, "maximum context length is 256 tokens. However, the input has 302 tokens"),
    (["a", "word " * 300], None, r"input\[1\] has 302 tokens"),
])
async def test_bad_inputs_are_400s_naming_input_before_anything_is_queued(
        fake: FakeEmbedBackends, texts: list[str] | None, ids: list[list[int]] | None, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match) as refused:
        await embed(fake, params(), texts=texts, token_ids=ids)
    assert refused.value.param == "input" and fake.admitted == []


async def test_the_tokens_of_a_request_are_bounded() -> None:
    with pytest.raises(InvalidRequest, match=f"at most {MAX_EMBED_TOKENS}") as refused:
        check_embed_inputs([250] * 1300, 256)
    assert refused.value.param == "input"
    assert check_embed_inputs([250] * 1200, 256) == 300_000


@pytest.mark.parametrize("where", ["frontend", "tokenizer tier"])
async def test_truncation_keeps_the_special_tokens_as_transformers_does(fake: FakeEmbedBackends, minilm_dir: Path,
                                                                        where: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    if where == "tokenizer tier":  # every text too long for the frontend to encode
        monkeypatch.setattr(embed_tokens, "INPROCESS_CHARS", 0)
    long = "the quick brown fox jumps over the lazy dog " * 40  # ~362 tokens
    fake.admissions.extend(["a:1", "a:1"])
    fake.script("a:1", None, None)
    await embed(fake, params(truncate_prompt_tokens=-1), texts=[long, "short"])
    reference = AutoTokenizer.from_pretrained(minilm_dir)
    sent = [list(i.ids) for i in fake.calls[0][1].inputs]
    assert sent == reference([long, "short"], truncation=True, max_length=256)["input_ids"]
    if where == "tokenizer tier":
        assert len(fake.encoded[0].texts) == 3  # the inputs and an empty text (the specials)
    else:
        assert fake.encoded == []
    await embed(fake, params(truncate_prompt_tokens=10, truncation_side="left"), texts=[long])
    left = [list(i.ids) for i in fake.calls[1][1].inputs][0]
    assert left == [101, *fake.ids(long)[-9:-1], 102]


def test_truncation_of_token_ids_and_its_bounds() -> None:
    assert truncate_ids([1, 2, 3, 4], 2, "right") == [1, 2]
    assert truncate_ids([1, 2, 3, 4], 2, "left") == [3, 4]
    assert truncate_ids([101, 5, 6, 7, 102], 4, "right", [101, 102]) == [101, 5, 6, 102]
    assert truncate_ids([1, 5, 6, 7], 3, "left", [1]) == [1, 6, 7]  # a BOS only
    assert truncate_ids([5, 6], 4, "right", [101, 102]) == [5, 6]
    assert embed_truncation(None, 256) is None and embed_truncation(-1, 256) == 256
    for bad in (0, -2, 257):
        with pytest.raises(InvalidRequest) as refused:
            embed_truncation(bad, 256)
        assert refused.value.param == "truncate_prompt_tokens"


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "input"),
    ({"model": MODEL, "input": 5}, "input"),
    ({"model": MODEL, "input": [1, "a"]}, "input"),
    ({"model": MODEL, "input": [True, False]}, "input"),
    ({"model": MODEL, "input": [-1]}, "input"),
    ({"model": MODEL, "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": MODEL, "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": MODEL, "input": "x", "truncate_prompt_tokens": -5}, "truncate_prompt_tokens"),
    ({"model": MODEL, "input": "x", "truncation_side": "middle"}, "truncation_side"),
    ({"model": "", "input": "x"}, "model"),
])
def test_malformed_bodies_are_400s_naming_the_parameter(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse(EmbeddingRequest, body)  # type: ignore[arg-type]
    assert refused.value.param == param


def test_every_input_shape_of_openai() -> None:
    def shape(value: object) -> tuple[list[str] | None, list[list[int]] | None]:
        req: EmbeddingRequest = parse(EmbeddingRequest, {"model": MODEL, "input": value})  # type: ignore[arg-type]
        texts = req.texts()
        return texts, None if texts is not None else req.token_ids()
    assert shape("hi") == (["hi"], None)
    assert shape(["a", "b"]) == (["a", "b"], None)
    assert shape([1, 2, 3]) == (None, [[1, 2, 3]])
    assert shape([[1, 2], [3]]) == (None, [[1, 2], [3]])
    assert shape([]) == ([], None)  # refused by the path: "input must not be empty"


def test_base64_is_little_endian_float32_as_openai_sends() -> None:
    values = [0.5, -1.25, 3.0e-8, 1.0]
    raw = base64.b64decode(base64_vector(values))
    assert raw == struct.pack("<4f", *values)
    body = response_body(EmbedResult(MODEL, [values], 7), "base64")
    assert body.startswith(b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":"')
    assert body.endswith(b'"model":"all-MiniLM-L6-v2","usage":{"prompt_tokens":7,"total_tokens":7}}')


def test_sim_vectors_are_deterministic_unit_vectors() -> None:
    a, b = sim_vector([101, 7592, 102], 384), sim_vector([101, 7592, 102], 384)
    c = sim_vector([101, 7593, 102], 384)
    assert a == b and len(a) == 384 and a != c
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-9)
