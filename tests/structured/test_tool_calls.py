"""The tool-call parser: the same calls and content however the output is split into stream deltas."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from infermesh.common.tool_format import call_text
from infermesh.frontend.request.tool_calls import ToolCallParser, finish_reason, parse_all

NAMES = frozenset({"get_weather", "get_time"})
TWO_CALLS = (call_text("get_weather", {"city": "Paris", "unit": "celsius"}) + "\n"
             + call_text("get_time", {"timezone": "CET"}))
OUTPUTS = [
    TWO_CALLS,
    "Let me check." + "\n" + call_text("get_time", {"timezone": "UTC"}),
    "No tools needed: 4.",
    "<tool_call>\nnot json\n</tool_call> and more",
    "An unfinished <tool_call>\n{\"name\": \"get_time\"",
    '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}',  # a bare call
    '{"answer": 42}',  # JSON content, not a call: names no tool
    "a < b and <tool_ is not a tag",
]


def _streamed(text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]]]:
    parser = ToolCallParser(NAMES)
    content, calls = "", []
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    for a, b in zip(points, points[1:], strict=False):
        piece, found = parser.feed(text[a:b])
        content += piece
        calls += found
    rest, more = parser.finish()
    return content + rest, [(c.name, c.arguments) for c in calls + more]


@pytest.mark.parametrize("text", OUTPUTS)
@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_split_gives_the_whole_outputs_calls_and_content(text: str, cuts: list[int]) -> None:
    whole_content, whole_calls = parse_all(text, NAMES)
    content, calls = _streamed(text, cuts)
    assert calls == [(c.name, c.arguments) for c in whole_calls]
    assert (content.strip() or None) == (whole_content.strip() if whole_content else None) or \
        (not calls and content == whole_content)


def test_calls_content_and_finish_reasons() -> None:
    content, calls = parse_all(TWO_CALLS, NAMES)
    assert content is None and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "celsius"}
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert parse_all(OUTPUTS[1], NAMES)[0] == "Let me check."
    assert parse_all(OUTPUTS[3], NAMES) == (OUTPUTS[3], [])  # a call that does not parse stays as text
    assert parse_all(OUTPUTS[4], NAMES) == (OUTPUTS[4], [])  # so does an unfinished one
    assert [c.name for c in parse_all(OUTPUTS[5], NAMES)[1]] == ["get_weather"]
    assert parse_all(OUTPUTS[6], NAMES) == (OUTPUTS[6], [])
    assert parse_all(OUTPUTS[5])[1] == []  # without tools, a bare object is content
    assert finish_reason("stop", 2) == "tool_calls" and finish_reason("length", 2) == "length"
    assert finish_reason("stop", 0) == "stop"


def test_content_streams_before_a_call_is_complete() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("The answer") == ("The answer", [])
    assert parser.feed(" is <tool") == (" is", [])  # the start of a tag is held back
    content, calls = parser.feed('_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>')
    assert content == "" and [c.name for c in calls] == ["get_time"]
    assert parser.finish() == ("", [])


def test_a_tagged_call_of_a_tool_not_offered_is_content() -> None:
    text = call_text("delete_everything", {})
    assert parse_all(text, NAMES) == (text, [])
    assert [c.name for c in parse_all(text)[1]] == ["delete_everything"]  # no tools known: taken as written
