"""The official `openai` client against a mesh on the real engine and the default model.

Small requests only (few tokens): the real engine runs on CPUs here.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.fixtures.mesh import Mesh
from tests.frontend.sse import metric_value, stream_sse, wait_for

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(real_mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_mesh.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
async def aclient(real_mesh: Mesh):
    c = openai.AsyncOpenAI(base_url=real_mesh.base_url, api_key="unused", max_retries=0, timeout=120)
    yield c
    await c.close()


def test_chat_greedy_answer_and_stream_equal_to_whole(client: openai.OpenAI, real_mesh: Mesh) -> None:
    whole = client.chat.completions.create(model=real_mesh.model, messages=QUESTION, temperature=0, max_tokens=12)
    text = whole.choices[0].message.content
    assert text.strip()
    assert whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = client.chat.completions.create(model=real_mesh.model, messages=QUESTION, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]


async def test_async_completions_stream_equal_to_whole_and_length(aclient: openai.AsyncOpenAI, real_mesh: Mesh) -> None:
    kwargs = dict(model=real_mesh.model, prompt="The three primary colors are", temperature=0, max_tokens=8)
    whole = await aclient.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8
    stream = await aclient.completions.create(**kwargs, stream=True)
    text = "".join([c.choices[0].text async for c in stream])
    assert text == whole.choices[0].text != ""


def test_stop_string_is_cut_and_not_included(client: openai.OpenAI, real_mesh: Mesh) -> None:
    base = client.chat.completions.create(model=real_mesh.model, messages=QUESTION, temperature=0, max_tokens=12)
    text = base.choices[0].message.content
    middle = len(text) // 2
    stop = text[middle:middle + 3]  # lands inside the answer, across token boundaries or not
    assert len(stop) == 3 and text.index(stop) > 0
    for stream in (False, True):
        reply = client.chat.completions.create(model=real_mesh.model, messages=QUESTION, temperature=0,
                                               max_tokens=12, stop=[stop], stream=stream)
        if stream:
            chunks = [c for c in reply if c.choices]
            got = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            got, finish = reply.choices[0].message.content, [reply.choices[0].finish_reason]
        assert got == text[:text.index(stop)]
        assert finish == ["stop"]


def test_n_2_and_seed_reproducibility(client: openai.OpenAI, real_mesh: Mesh) -> None:
    kwargs = dict(model=real_mesh.model, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=1234, n=2)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == 12


def test_unicode_round_trip_without_replacement_characters(client: openai.OpenAI, real_mesh: Mesh) -> None:
    messages = [{"role": "user", "content": "Répète exactement: «café crème» — 東京 😀"}]
    whole = client.chat.completions.create(model=real_mesh.model, messages=messages, temperature=0, max_tokens=16)
    stream = client.chat.completions.create(model=real_mesh.model, messages=messages, temperature=0, max_tokens=16,
                                            stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert not any("\ufffd" in p for p in pieces)


def test_logprobs(client: openai.OpenAI, real_mesh: Mesh) -> None:
    reply = client.chat.completions.create(model=real_mesh.model, messages=QUESTION, temperature=0, max_tokens=4,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(x.logprob <= 0 and len(x.top_logprobs) >= 1 for x in content)


async def test_disconnect_returns_the_engine_to_idle_within_2s(real_mesh: Mesh, real_worker) -> None:
    running = lambda: metric_value(real_worker.metrics_text(), "vllm:num_requests_running")  # noqa: E731
    body = {"model": real_mesh.model, "prompt": "Write a long essay about rivers.", "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=real_mesh.url, timeout=120) as http, \
            http.stream("POST", "/v1/completions", json=body) as reply:
        tokens = 0
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and '"text":""' not in line:
                tokens += 1
                if tokens >= 2:
                    break
        assert running() >= 1
    took = await asyncio.to_thread(wait_for, lambda: running() == 0, 2.0)
    assert took < 2.0


async def test_errors_on_the_real_mesh_and_still_serving(real_mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=real_mesh.url, timeout=120) as http:
        too_long = await http.post("/v1/chat/completions", json={"model": real_mesh.model, "messages": QUESTION,
                                                                  "max_tokens": 9000})
        assert too_long.status_code == 400 and "maximum context length" in too_long.json()["error"]["message"]
        unknown = await http.post("/v1/chat/completions", json={"model": "gpt-nope", "messages": QUESTION})
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
        ok = await stream_sse(http, "/v1/chat/completions", {"model": real_mesh.model, "messages": QUESTION,
                                                             "max_tokens": 2, "temperature": 0})
        assert ok.status == 200 and ok.events[-1] == "[DONE]" and ok.text()
