"""The request path in-process, against fakes of the tiers: refusals, migration, cancellation, n > 1."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from infermesh.common.errors import DeadlineExceeded, InvalidRequest, Overloaded, Unavailable
from infermesh.frontend.request.generation import Generation, ServingOptions, start_generation
from infermesh.frontend.request.output import OutputBuffer
from infermesh.v1 import common_pb2, scheduler_pb2

from tests.frontend.fakes import FakeBackends, Pause, rpc_error, tokens

WORKER_FAILED = scheduler_pb2.LEASE_OUTCOME_WORKER_FAILED
CANCELLED = scheduler_pb2.LEASE_OUTCOME_CANCELLED


@pytest.fixture
def fake(model_dir: Path) -> FakeBackends:
    return FakeBackends(model_dir)


async def start(fake: FakeBackends, prompt: str = "Paris is", **sampling: object) -> Generation:
    return await start_generation(fake, ServingOptions(), request_id="rid", model="m",
                                  sampling=common_pb2.SamplingParams(**sampling), tenant="t", priority=0,
                                  prompt=prompt)


async def drain(output: OutputBuffer, timeout: float = 5.0) -> dict[int, str]:
    texts: dict[int, str] = {}

    async def run() -> None:
        while not output.done:
            await output.wait()
            for d in output.take():
                texts[d.index] = texts.get(d.index, "") + d.text
    await asyncio.wait_for(run(), timeout)
    return texts


async def test_a_refusal_before_the_first_token_is_the_error(fake: FakeBackends) -> None:
    fake.admissions.append(Overloaded("the admission queue is full", retry_after=2.0))
    gen = await start(fake, max_tokens=4)
    await drain(gen.output)
    assert isinstance(gen.output.error, Overloaded) and gen.output.error.retry_after == 2.0
    assert gen.output.decided.is_set() and not fake.calls
    await gen.close()


async def test_a_worker_refusing_at_capacity_is_excluded_and_another_serves(fake: FakeBackends) -> None:
    ids = fake.encode(" the capital of France.")
    fake.admissions.extend(["w1", "w2"])
    fake.script("w1", rpc_error(Overloaded("worker at capacity", retry_after=0.2)))
    fake.script("w2", tokens(ids, finish="stop"))
    gen = await start(fake, max_tokens=32)
    texts = await drain(gen.output)
    assert gen.output.error is None and texts == {0: " the capital of France."}
    assert list(fake.admitted[1].exclude_workers) == ["w1"]
    assert fake.released == [("lease-1", WORKER_FAILED)]
    await gen.close()


@pytest.mark.parametrize("k", [1, 3, 6])
async def test_a_worker_dying_after_k_tokens_continues_with_exactly_the_right_text(fake: FakeBackends, k: int) -> None:
    text = " a city of lights, art and food, on the Seine."
    ids = fake.encode(text)
    assert len(ids) > k + 2
    fake.admissions.extend(["w1", "w2"])
    fake.script("w1", *[tokens([t]) for t in ids[:k]], rpc_error(Unavailable("worker went away")))
    fake.script("w2", tokens(ids[k:], finish="stop"))
    gen = await start(fake, max_tokens=40)
    texts = await drain(gen.output)
    assert texts == {0: text} and gen.output.error is None
    resumed = fake.calls[1][1].request
    assert list(resumed.generated_ids) == ids[:k]  # the new worker continues from what was sent
    assert list(resumed.prompt_ids) == fake.encode("Paris is")
    second = fake.admitted[1]
    assert second.prompt_tokens == len(resumed.prompt_ids) + k and second.max_tokens == 40 - k
    assert gen.output.completion_tokens == len(ids)
    await gen.close()


async def test_a_bad_request_refused_by_the_worker_is_not_retried(fake: FakeBackends) -> None:
    fake.admissions.append("w1")
    fake.script("w1", rpc_error(InvalidRequest("top_k must be ...", param="top_k")))
    gen = await start(fake, max_tokens=4)
    await drain(gen.output)
    assert isinstance(gen.output.error, InvalidRequest) and len(fake.admitted) == 1
    assert fake.released == [("lease-1", CANCELLED)]  # not the worker's failure
    await gen.close()


async def test_a_cancelled_client_cancels_the_worker_call_and_releases_the_lease(fake: FakeBackends) -> None:
    pause = Pause()
    fake.admissions.append("w1")
    fake.script("w1", pause, tokens(fake.encode(" never"), finish="stop"))
    gen = await start(fake, max_tokens=8)
    await asyncio.wait_for(pause.reached.wait(), 5)
    await gen.close()  # what the HTTP and gRPC readers do when their client goes away
    _, call = fake.calls[0]
    assert call.cancelled()
    assert fake.released == [("lease-1", CANCELLED)]
    assert gen.output.completion_tokens == 0


async def test_n_choices_interleave_and_a_failed_choice_resumes_on_its_own(fake: FakeBackends) -> None:
    a, b = fake.encode(" one two three four"), fake.encode(" five six seven eight")
    fake.admissions.extend(["w1", "w2", "w3"])
    fake.script("w1", tokens(a[:2], index=0), tokens(b[:1], index=1), tokens(a[2:], index=0, finish="stop"),
                rpc_error(Unavailable("worker died")))
    fake.script("w2", tokens(b[1:], finish="stop"))  # choice 1 alone, from its own tokens
    gen = await start(fake, max_tokens=16, n=2)
    texts = await drain(gen.output)
    assert texts == {0: " one two three four", 1: " five six seven eight"}
    assert fake.admitted[0].n == 2 and fake.admitted[1].n == 1
    resumed = fake.calls[1][1].request
    assert list(resumed.generated_ids) == b[:1] and resumed.sampling.n == 1
    await gen.close()


async def test_stop_strings_end_the_choice_and_free_the_worker(fake: FakeBackends) -> None:
    ids = fake.encode(" Paris. END and more text")
    fake.admissions.append("w1")
    fake.script("w1", *[tokens([t]) for t in ids], tokens([], finish="length"))
    gen = await start(fake, max_tokens=32, stop=["END"])
    texts = await drain(gen.output)
    assert texts == {0: " Paris. "} and gen.output.choices[0].finish_reason == "stop"
    assert fake.calls[0][1].cancelled()  # the rest is not generated
    assert "END" not in [s for s in fake.calls[0][1].request.sampling.stop]  # the engine never sees stops
    await gen.close()


async def test_limits_and_the_workers_window_are_checked_before_admission(fake: FakeBackends) -> None:
    fake.facts["m"] = fake.facts["m"].__class__("m", 12, 16)
    with pytest.raises(InvalidRequest, match="maximum context length is 12") as info:
        await start(fake, max_tokens=20)
    assert info.value.param == "max_tokens"
    with pytest.raises(InvalidRequest) as info:
        await start(fake, repetition_penalty=2.5)
    assert info.value.param == "repetition_penalty"
    del fake.facts["m"]
    with pytest.raises(Unavailable):  # the tokenizer knows the model, no worker serves it
        await start(fake, max_tokens=2)
    assert not fake.admitted


async def test_the_deadline_bounds_admission_and_travels_to_the_worker(fake: FakeBackends) -> None:
    import time

    fake.admissions.append("w1")
    fake.script("w1", tokens(fake.encode(" ok"), finish="stop"))
    gen = await start_generation(fake, ServingOptions(admit_timeout=30), request_id="rid", model="m",
                                 sampling=common_pb2.SamplingParams(max_tokens=4), tenant="t", priority=0,
                                 prompt="hi", deadline=time.time() + 2.0)
    await drain(gen.output)
    assert fake.admit_timeouts[0] is not None and 1.0 < fake.admit_timeouts[0] <= 2.0
    assert fake.admitted[0].context.HasField("deadline")
    assert fake.calls[0][1].request.context.deadline.seconds == fake.admitted[0].context.deadline.seconds
    await gen.close()
    with pytest.raises(DeadlineExceeded):
        await start_generation(fake, ServingOptions(), request_id="rid", model="m",
                               sampling=common_pb2.SamplingParams(), tenant="t", priority=0, prompt="hi",
                               deadline=time.time() - 1)


async def test_a_worker_deadline_error_fails_the_request_without_retrying(fake: FakeBackends) -> None:
    fake.admissions.append("w1")
    fake.script("w1", tokens(fake.encode(" a")), rpc_error(DeadlineExceeded("deadline passed")))
    gen = await start(fake, max_tokens=8)
    await drain(gen.output)
    assert isinstance(gen.output.error, DeadlineExceeded) and len(fake.admitted) == 1
    assert gen.output.error.grpc_code is grpc.StatusCode.DEADLINE_EXCEEDED
    await gen.close()


async def test_prefix_hashes_use_the_workers_block_size_and_the_model_salt(fake: FakeBackends) -> None:
    from infermesh.common.prefix import block_hashes, cache_salt
    from infermesh.frontend.request.interfaces import ModelFacts

    prompt = " ".join(f"word{i}" for i in range(200))
    ids = fake.encode(prompt)
    for block in (16, 32):
        fake.facts["m"] = ModelFacts("m", 4096, block)
        fake.admissions.append("w1")
        fake.script("w1", tokens(fake.encode(" ok"), finish="stop"))
        gen = await start(fake, prompt=prompt, max_tokens=4)
        await drain(gen.output)
        await gen.close()
        sent = list(fake.admitted[-1].prefix_hashes)
        assert sent == block_hashes(ids, block, cache_salt("m")) and len(sent) == len(ids) // block
    assert block_hashes(ids, 32, cache_salt("m")) != block_hashes(ids, 32, cache_salt("other"))


async def test_a_versions_prefix_hashes_are_salted_by_its_version(fake: FakeBackends) -> None:
    """Prefix affinity never takes a version's blocks for another's: the served name's version salts them."""
    from infermesh.common.prefix import block_hashes, cache_salt
    from infermesh.frontend.request.interfaces import ModelFacts

    prompt = " ".join(f"word{i}" for i in range(64))
    ids = fake.encode(prompt)
    sent = {}
    for served in ("m@v1", "m@v2"):
        fake.facts[served] = ModelFacts(served, 4096, 16)
        fake.admissions.append("w1")
        fake.script("w1", tokens(fake.encode(" ok"), finish="stop"))
        gen = await start_generation(fake, ServingOptions(), request_id="rid", model=served,
                                     sampling=common_pb2.SamplingParams(max_tokens=4), tenant="t", priority=0,
                                     prompt=prompt)
        await drain(gen.output)
        await gen.close()
        sent[served] = list(fake.admitted[-1].prefix_hashes)
    assert sent["m@v1"] == block_hashes(ids, 16, cache_salt("m", "v1"))
    assert sent["m@v2"] == block_hashes(ids, 16, cache_salt("m", "v2")) and sent["m@v1"] != sent["m@v2"]


async def test_a_model_whose_workers_have_not_reported_a_window_is_unavailable_not_a_bad_request(
        fake: FakeBackends) -> None:
    from infermesh.frontend.request.interfaces import ModelFacts

    fake.facts["m"] = ModelFacts("m", 0, 0)  # an engine still starting
    with pytest.raises(Unavailable, match="context window"):
        await start(fake, max_tokens=4)
