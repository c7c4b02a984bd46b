"""Tool calling on the real engine through the official `openai` client: every tool_choice, streamed and whole.

SmolLM2-135M-Instruct's chat template takes no tools, so these run through the mesh's own tool prompt;
`required` and a named function are guaranteed by the worker's grammar (the arguments validate against
the function's schema). Qwen2.5-Coder's template takes tools: `auto` there is the model's own decision.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures.mesh import Mesh

pytestmark = pytest.mark.engine

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["timezone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone.",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(real_mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_mesh.base_url, api_key="unused", max_retries=0, timeout=180)


def _valid_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _streamed_calls(chunks: list[Any]) -> tuple[dict[int, dict[str, str]], str | None, str]:
    """The calls a stream's tool-call deltas add up to (by index), its finish reason and its content."""
    calls: dict[int, dict[str, str]] = {}
    finish, content = None, ""
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or ():
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return calls, finish, content


def test_required_gives_valid_calls_whole_and_streamed(client: openai.OpenAI, real_mesh: Mesh) -> None:
    whole = client.chat.completions.create(model=real_mesh.model, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=200)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and not choice.message.content
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        _valid_call(call.function.name, call.function.arguments)
    calls, finish, content = _streamed_calls(list(client.chat.completions.create(
        model=real_mesh.model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.9, seed=7,
        max_tokens=200, stream=True)))
    assert finish == "tool_calls" and calls and not content.strip()
    assert sorted(calls) == list(range(len(calls)))
    for call in calls.values():
        _valid_call(call["name"], call["arguments"])


def test_named_function_and_no_parallel_calls(client: openai.OpenAI, real_mesh: Mesh) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    for stream in (False, True):
        reply = client.chat.completions.create(model=real_mesh.model, messages=ASK, tools=TOOLS, tool_choice=named,
                                               temperature=0.7, seed=2, max_tokens=60, stream=stream)
        if stream:
            calls, finish, _ = _streamed_calls(list(reply))
            got = [(c["name"], c["arguments"]) for c in calls.values()]
        else:
            finish = reply.choices[0].finish_reason
            got = [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls]
        assert finish == "tool_calls" and len(got) == 1 and got[0][0] == "get_time"
        _valid_call(*got[0])
    single = client.chat.completions.create(model=real_mesh.model, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, temperature=1.0, seed=4, max_tokens=80)
    assert len(single.choices[0].message.tool_calls) == 1


def test_none_hides_the_tools_and_auto_parses_what_the_model_says(client: openai.OpenAI, real_mesh: Mesh) -> None:
    plain = client.chat.completions.create(model=real_mesh.model, messages=ASK, temperature=0, max_tokens=10)
    none = client.chat.completions.create(model=real_mesh.model, messages=ASK, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=10)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # the tools were not shown
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert not none.choices[0].message.tool_calls
    auto = client.chat.completions.create(model=real_mesh.model, messages=ASK, tools=TOOLS, temperature=0,
                                          max_tokens=60)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # the tool prompt was shown
    message = auto.choices[0].message
    assert message.tool_calls or message.content
    if message.tool_calls:
        assert auto.choices[0].finish_reason == "tool_calls"
        assert "<tool_call>" not in (message.content or "")


def test_the_next_turn_carries_the_tool_result(client: openai.OpenAI, real_mesh: Mesh) -> None:
    first = client.chat.completions.create(model=real_mesh.model, messages=ASK, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "clear"})}]
    second = client.chat.completions.create(model=real_mesh.model, messages=turn, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=30)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    plain = client.chat.completions.create(model=real_mesh.model, messages=ASK, temperature=0, max_tokens=1)
    # The call and its result are in the prompt (the tools are not: tool_choice none).
    assert second.usage.prompt_tokens > plain.usage.prompt_tokens + 20


@pytest.mark.parametrize("change, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_definitions_are_a_400_naming_the_field(real_mesh: Mesh, change: dict, param: str) -> None:
    body = {"model": real_mesh.model, "messages": ASK, "max_tokens": 5, **change}
    reply = httpx.post(real_mesh.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.json()


def test_qwen_calls_a_tool_of_its_own_accord(demo_mesh: Any) -> None:
    """Qwen2.5's template shows the tools itself; with tool_choice auto the call is the model's."""
    client = openai.OpenAI(base_url=demo_mesh.base_url, api_key="unused", max_retries=0, timeout=180)
    reply = client.chat.completions.create(model="chat-large", messages=ASK, tools=TOOLS, temperature=0,
                                           max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] == "Paris"
