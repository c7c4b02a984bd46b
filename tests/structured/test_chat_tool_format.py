"""Chat chunks and responses with tool calls (`ChatFormat` with `tool_names`), from plain deltas and results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from infermesh.common.tool_format import call_text
from infermesh.frontend.chat.serving import ChatFormat
from infermesh.frontend.request.detokenizer import TokenizerModel
from infermesh.frontend.request.output import ChoiceResult, Delta, Result, Usage

NAMES = frozenset({"get_weather", "get_time"})
WEATHER_CALL = call_text("get_weather", {"city": "Paris", "unit": "celsius"})
TIME_CALL = call_text("get_time", {"timezone": "CET"})
OUTPUT = "Let me check." + "\n" + WEATHER_CALL + "\n" + TIME_CALL


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> TokenizerModel:
    return TokenizerModel("m", (model_dir / "tokenizer.json").read_bytes(), [2])


def fmt(tokenizer: TokenizerModel, names: frozenset[str] | None = NAMES) -> ChatFormat:
    return ChatFormat("chatcmpl-1", 1700000000, "m", tokenizer, logprobs=False, tool_names=names)


def streamed(f: ChatFormat, text: str, size: int, reason: str = "stop", index: int = 0) -> list[dict[str, Any]]:
    """The choices of the chunks of `text` cut into pieces of `size` characters, the last with `reason`."""
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    deltas = [Delta(index, p, [], [], "") for p in pieces] + [Delta(index, "", [], [], reason)]
    raw = f.chunks(deltas).decode()
    return [json.loads(line[6:])["choices"][0] for line in raw.split("\n\n") if line.startswith("data: {")]


def calls_of(choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for choice in choices for c in choice["delta"].get("tool_calls", [])]


def content_of(choices: list[dict[str, Any]]) -> str:
    return "".join(choice["delta"].get("content", "") for choice in choices)


@pytest.mark.parametrize("size", [1, 3, 7, 40, len(OUTPUT)])
def test_streamed_calls_are_openai_tool_call_deltas(tokenizer: TokenizerModel, size: int) -> None:
    choices = streamed(fmt(tokenizer), OUTPUT, size)
    calls = calls_of(choices)
    assert [c["index"] for c in calls] == [0, 1]
    assert [c["type"] for c in calls] == ["function", "function"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris", "unit": "celsius"},
                                                                       {"timezone": "CET"}]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert content_of(choices).strip() == "Let me check."
    assert "<tool_call>" not in content_of(choices)
    assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)
    assert choices[-1]["finish_reason"] == "tool_calls"
    assert all(choice["index"] == 0 for choice in choices)


def test_each_call_is_sent_once_whole_in_the_chunk_that_completes_it(tokenizer: TokenizerModel) -> None:
    f = fmt(tokenizer)
    first = f.chunks([Delta(0, WEATHER_CALL[:20], [], [], ""), Delta(0, WEATHER_CALL[20:], [], [], "")]).decode()
    bodies = [json.loads(line[6:])["choices"][0]["delta"] for line in first.split("\n\n") if line]
    assert bodies[0] == {} and bodies[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    last = json.loads(f.chunk(Delta(0, "\n" + TIME_CALL, [], [], "stop"))[6:])["choices"][0]
    assert [c["index"] for c in last["delta"]["tool_calls"]] == [1]  # indexes go on across chunks
    assert last["finish_reason"] == "tool_calls"


def test_a_cut_off_output_stays_length(tokenizer: TokenizerModel) -> None:
    choices = streamed(fmt(tokenizer), WEATHER_CALL + "\n" + TIME_CALL[:25], 9, reason="length")
    assert [c["function"]["name"] for c in calls_of(choices)] == ["get_weather"]
    assert choices[-1]["finish_reason"] == "length"
    assert content_of(choices).strip() == TIME_CALL[:25]  # the unfinished call is content, not dropped


def test_text_only_output_streams_as_content(tokenizer: TokenizerModel) -> None:
    text = "No tool is needed: it is 4 < 5."
    choices = streamed(fmt(tokenizer), text, 4)
    assert calls_of(choices) == [] and content_of(choices) == text
    assert choices[-1]["finish_reason"] == "stop"


def test_a_bare_json_call_naming_a_tool_is_a_call(tokenizer: TokenizerModel) -> None:
    bare = '{"name": "get_time", "arguments": {"timezone": "UTC"}}'
    choices = streamed(fmt(tokenizer), bare, 5)
    assert [c["function"]["name"] for c in calls_of(choices)] == ["get_time"]
    assert content_of(choices) == "" and choices[-1]["finish_reason"] == "tool_calls"
    other = '{"name": "get_stock", "arguments": {}}'
    choices = streamed(fmt(tokenizer), other, 5)
    assert calls_of(choices) == [] and content_of(choices) == other


def test_choices_are_parsed_apart(tokenizer: TokenizerModel) -> None:
    f = fmt(tokenizer)
    half = len(WEATHER_CALL) // 2
    raw = f.chunks([Delta(0, WEATHER_CALL[:half], [], [], ""), Delta(1, "Hello", [], [], ""),
                    Delta(0, WEATHER_CALL[half:], [], [], "stop"), Delta(1, " there", [], [], "stop")]).decode()
    choices = [json.loads(line[6:])["choices"][0] for line in raw.split("\n\n") if line]
    by_index = {i: [c for c in choices if c["index"] == i] for i in (0, 1)}
    assert [c["function"]["name"] for c in calls_of(by_index[0])] == ["get_weather"]
    assert by_index[0][-1]["finish_reason"] == "tool_calls"
    assert calls_of(by_index[1]) == [] and content_of(by_index[1]) == "Hello there"
    assert by_index[1][-1]["finish_reason"] == "stop"


def test_without_tool_names_the_output_is_plain_content(tokenizer: TokenizerModel) -> None:
    choices = streamed(fmt(tokenizer, None), OUTPUT, 6)
    assert calls_of(choices) == [] and content_of(choices) == OUTPUT
    assert choices[-1]["finish_reason"] == "stop"
    body = fmt(tokenizer, None).response(Result([ChoiceResult(0, OUTPUT, "stop")], Usage(5, 30)))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": OUTPUT}
    assert body["choices"][0]["finish_reason"] == "stop"


def test_response_gives_tool_calls_and_no_content(tokenizer: TokenizerModel) -> None:
    body = fmt(tokenizer).response(Result([ChoiceResult(0, WEATHER_CALL + "\n" + TIME_CALL, "stop"),
                                           ChoiceResult(1, OUTPUT, "stop"),
                                           ChoiceResult(2, "Just text.", "stop"),
                                           ChoiceResult(3, WEATHER_CALL, "length")], Usage(5, 30)))
    assert body["object"] == "chat.completion"
    calls_only, mixed, text, cut = (c for c in body["choices"])
    message = calls_only["message"]
    assert message["role"] == "assistant" and message["content"] is None
    assert [(c["type"], c["function"]["name"]) for c in message["tool_calls"]] == [("function", "get_weather"),
                                                                                  ("function", "get_time")]
    assert all("index" not in c and c["id"].startswith("call_") for c in message["tool_calls"])
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert calls_only["finish_reason"] == "tool_calls"
    assert mixed["message"]["content"] == "Let me check." and len(mixed["message"]["tool_calls"]) == 2
    assert text["message"] == {"role": "assistant", "content": "Just text."} and text["finish_reason"] == "stop"
    assert cut["finish_reason"] == "length" and len(cut["message"]["tool_calls"]) == 1
