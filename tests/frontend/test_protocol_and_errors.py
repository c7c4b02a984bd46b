"""Request validation, conversion to sampling parameters and API keys, in-process (the error table has its
own test: tests/common/test_error_table.py)."""

from __future__ import annotations

import pytest
from infermesh.common.errors import InvalidRequest, Unauthenticated, http_status
from infermesh.common.limits import check_sampling
from infermesh.frontend.auth import ApiKeys
from infermesh.frontend.chat.protocol import ChatCompletionRequest
from infermesh.frontend.completions.protocol import CompletionRequest
from infermesh.frontend.openai.protocol import parse
from infermesh.v1 import common_pb2

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({**CHAT, "max_tokens": -1}, "max_tokens"),
    ({**CHAT, "max_tokens": "many"}, "max_tokens"),
    ({**CHAT, "temperature": 3}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "n": 1000}, "n"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "top_logprobs": 3}, None),
    ({**CHAT, "messages": "hi"}, "messages"),
    ({**CHAT, "messages": [{"content": "no role"}]}, "messages"),
    ({**CHAT, "stream_options": {"include_usage": "sometimes"}}, "stream_options"),
])
def test_invalid_chat_requests_name_the_parameter(body: dict, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(ChatCompletionRequest, body)
    assert info.value.param == param
    assert http_status(info.value) == 400


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse(ChatCompletionRequest, ["not", "an", "object"])


def test_unknown_fields_are_ignored_and_sampling_is_converted() -> None:
    req = parse(ChatCompletionRequest, {**CHAT, "frobnicate": True, "max_tokens": 7, "max_completion_tokens": 9,
                                        "temperature": 0, "seed": 42, "stop": "END", "n": 2, "logprobs": True,
                                        "top_logprobs": 3, "presence_penalty": 0.5, "priority": "high",
                                        "stream": True, "stream_options": {"include_usage": True}})
    s = req.to_sampling()
    assert s.max_tokens == 9  # max_completion_tokens wins
    assert s.HasField("temperature") and s.temperature == 0
    assert (s.seed, list(s.stop), s.n, s.logprobs) == (42, ["END"], 2, 3)
    assert s.presence_penalty == pytest.approx(0.5)
    assert not s.HasField("top_p")
    assert req.include_usage and req.priority_value == common_pb2.PRIORITY_HIGH


def test_chat_content_parts_are_joined_and_other_parts_refused() -> None:
    req = parse(ChatCompletionRequest, {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.chat_messages()[0].content == "ab"
    req = parse(ChatCompletionRequest, {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    with pytest.raises(InvalidRequest, match="only text parts"):
        req.chat_messages()


def test_completion_prompts() -> None:
    assert parse(CompletionRequest, {"model": "m", "prompt": "hi"}).prompt_input() == "hi"
    assert parse(CompletionRequest, {"model": "m", "prompt": ["hi"]}).prompt_input() == "hi"
    assert parse(CompletionRequest, {"model": "m", "prompt": [1, 2, 3]}).prompt_input() == [1, 2, 3]
    assert parse(CompletionRequest, {"model": "m", "prompt": "x"}).to_sampling().max_tokens == 16
    with pytest.raises(InvalidRequest, match="one prompt"):
        parse(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).prompt_input()
    with pytest.raises(InvalidRequest, match="echo"):
        parse(CompletionRequest, {"model": "m", "prompt": "x", "echo": True})
    with pytest.raises(InvalidRequest):
        parse(CompletionRequest, {"model": "m"})


def test_api_keys() -> None:
    keys = ApiKeys("alice:k-alice, bob:k-bob")
    assert keys.enabled and "k-alice" not in repr(keys)
    assert keys.tenant("Bearer k-bob") == "bob"
    assert keys.tenant("bearer k-alice") == "alice"
    for bad in (None, "", "Bearer", "Basic k-bob", "Bearer k-carol"):
        with pytest.raises(Unauthenticated):
            keys.tenant(bad)
    assert ApiKeys("").tenant(None) == "anonymous"
    with pytest.raises(InvalidRequest) as info:
        ApiKeys("alice:k1,broken")
    assert "k1" not in info.value.message


def test_grpc_sampling_limits_match_http() -> None:
    check_sampling(common_pb2.SamplingParams(temperature=0, top_p=1, n=2, max_tokens=5))
    for bad in (common_pb2.SamplingParams(temperature=2.5), common_pb2.SamplingParams(top_p=0),
                common_pb2.SamplingParams(n=99), common_pb2.SamplingParams(max_tokens=0),
                common_pb2.SamplingParams(temperature=float("nan")), common_pb2.SamplingParams(logprobs=50)):
        with pytest.raises(InvalidRequest):
            check_sampling(bad)
