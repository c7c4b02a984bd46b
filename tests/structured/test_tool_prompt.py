"""Tools in the prompt: the mesh's tool prompt for SmolLM2 (its template takes no tools), Qwen2.5-Coder's own
template (ids equal to transformers'), and the tokenizer service's Render carrying tools over gRPC."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from infermesh.common.tool_format import CALL_END, CALL_START, call_text
from infermesh.tokenizer import tool_prompt
from infermesh.tokenizer.models import ModelTokenizer
from infermesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from transformers import AutoTokenizer

from tests.harness import ServiceProcess

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time now",
                                           "parameters": {"type": "object", "properties": {}}}}]
USER = {"role": "user", "content": "Weather in Paris and the time?"}
CALLS = {"role": "assistant", "content": "",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]}
RESULTS = [{"role": "tool", "content": '{"temp": 18}', "tool_call_id": "call_1"},
           {"role": "tool", "content": "14:05", "tool_call_id": "call_2"}]


@pytest.fixture(scope="module")
def smol(model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.load(model_dir.name, model_dir)


@pytest.fixture(scope="module")
def smol_hf(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.load(qwen_dir.name, qwen_dir)


@pytest.fixture(scope="module")
def qwen_hf(qwen_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(qwen_dir)


def text_of(model: ModelTokenizer, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return str(model.tokenizer.decode(model.render_chat(messages, **kwargs), skip_special_tokens=False))


def turns(text: str) -> list[tuple[str, str]]:
    """The rendered ChatML turns as (role, content)."""
    out = []
    for part in text.split("<|im_start|>")[1:]:
        role, _, body = part.partition("\n")
        out.append((role, body.split("<|im_end|>")[0]))
    return out


def hf_ids(hf: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


# ---- the mesh's tool prompt (SmolLM2) ---------------------------------------------------------------

def test_the_templates_that_take_tools_are_told_apart(smol: ModelTokenizer, qwen: ModelTokenizer) -> None:
    assert smol.chat_template is not None and not smol.chat_template.takes_tools
    assert qwen.chat_template is not None and qwen.chat_template.takes_tools


def test_tools_become_a_new_system_turn(smol: ModelTokenizer) -> None:
    rendered = turns(text_of(smol, [USER], tools=TOOLS))
    assert [r for r, _ in rendered] == ["system", "user", "assistant"]
    system = rendered[0][1]
    assert system == tool_prompt.instructions(TOOLS)
    assert "SmolLM" not in system  # the tool prompt takes the place of the template's default system turn
    for t in TOOLS:
        assert json.dumps(t, ensure_ascii=False) in system
    assert f"{CALL_START}\n" + '{"name": <function-name>, "arguments": <args-json-object>}\n' + CALL_END in system
    assert rendered[1] == ("user", USER["content"])


def test_tools_are_merged_into_a_given_system_message(smol: ModelTokenizer) -> None:
    rendered = turns(text_of(smol, [{"role": "system", "content": "Answer briefly."}, USER], tools=TOOLS))
    assert [r for r, _ in rendered] == ["system", "user", "assistant"]
    assert rendered[0][1] == "Answer briefly.\n\n" + tool_prompt.instructions(TOOLS)
    empty = turns(text_of(smol, [{"role": "system", "content": ""}, USER], tools=TOOLS))
    assert empty[0] == ("system", tool_prompt.instructions(TOOLS))


def test_earlier_calls_and_results_are_shown_as_text(smol: ModelTokenizer) -> None:
    rendered = turns(text_of(smol, [USER, CALLS, *RESULTS, {"role": "user", "content": "Thanks"}], tools=TOOLS))
    assert [r for r, _ in rendered] == ["system", "user", "assistant", "user", "user", "assistant"]
    assert rendered[2][1] == (call_text("get_weather", {"city": "Paris"}) + "\n" + call_text("get_time", {}))
    assert rendered[3][1] == ('<tool_response>\n{"temp": 18}\n</tool_response>\n'
                              "<tool_response>\n14:05\n</tool_response>")
    assert rendered[4] == ("user", "Thanks")


def test_an_assistant_turns_text_comes_before_its_calls(smol: ModelTokenizer) -> None:
    calls = {**CALLS, "content": "Let me look."}
    rendered = turns(text_of(smol, [USER, calls, RESULTS[0]], tools=TOOLS))
    assert rendered[2][1].startswith("Let me look.\n" + CALL_START)
    assert rendered[3][1].count("<tool_response>") == 1


def test_earlier_calls_without_tools_are_rewritten_too(smol: ModelTokenizer) -> None:
    rendered = turns(text_of(smol, [USER, CALLS, RESULTS[0]]))
    assert "# Tools" not in rendered[0][1]  # no tools offered: the template's own system turn
    assert rendered[2] == ("assistant", call_text("get_weather", {"city": "Paris"}) + "\n" + call_text("get_time", {}))
    assert rendered[3] == ("user", '<tool_response>\n{"temp": 18}\n</tool_response>')


def test_rewrite_does_not_change_its_input() -> None:
    messages = [USER, CALLS, *RESULTS]
    before = json.dumps(messages)
    out = tool_prompt.rewrite(messages, TOOLS)
    assert json.dumps(messages) == before
    assert all(set(m) <= {"role", "content", "name"} for m in out)


@pytest.mark.parametrize("messages", [
    [USER],
    [{"role": "system", "content": "Be kind."}, USER, {"role": "assistant", "content": "Sunny."},
     {"role": "user", "content": "And tomorrow?"}],
    [USER, {"role": "tool", "content": "18C", "tool_call_id": "x"}],
])
def test_without_tools_rendering_is_transformers(smol: ModelTokenizer, smol_hf: Any,
                                                 messages: list[dict[str, Any]]) -> None:
    assert smol.render_chat(messages) == hf_ids(smol_hf, messages)
    assert smol.render_chat(messages, tools=[]) == hf_ids(smol_hf, messages)


# ---- a template that takes tools (Qwen2.5-Coder): transformers' ids -----------------------------------

@pytest.mark.parametrize("messages", [
    [USER],
    [{"role": "system", "content": "You are a weather bot."}, USER],
    [USER, CALLS, *RESULTS],
    [{"role": "system", "content": "Be brief."}, USER, {**CALLS, "content": "Checking."}, RESULTS[0],
     {"role": "assistant", "content": "It is 18 degrees."}, {"role": "user", "content": "Thanks!"}],
], ids=["user", "system", "calls-and-results", "long"])
def test_qwen_renders_tools_as_transformers(qwen: ModelTokenizer, qwen_hf: Any,
                                            messages: list[dict[str, Any]]) -> None:
    ids = qwen.render_chat(messages, tools=TOOLS)
    assert ids == hf_ids(qwen_hf, messages, tools=TOOLS)
    assert ids != qwen.render_chat(messages)  # the tools are in the prompt
    assert '"name": "get_weather"' in str(qwen.tokenizer.decode(ids))


# ---- over gRPC: Render with tools ------------------------------------------------------------------

@pytest.fixture(scope="module")
def stub(tokenizer_proc: ServiceProcess) -> Any:
    with grpc.insecure_channel(tokenizer_proc.address) as channel:
        yield tokenizer_pb2_grpc.TokenizerStub(channel)


def _proto_tools() -> list[common_pb2.Tool]:
    return [common_pb2.Tool(name=t["function"]["name"], description=t["function"]["description"],
                            parameters=json.dumps(t["function"]["parameters"])) for t in TOOLS]


def test_render_over_grpc_shows_tools_calls_and_results(stub: Any, smol: ModelTokenizer) -> None:
    messages = [
        common_pb2.ChatMessage(role="user", content=USER["content"]),
        common_pb2.ChatMessage(role="assistant", tool_calls=[
            common_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
            common_pb2.ToolCall(id="call_2", name="get_time", arguments="{}")]),
        common_pb2.ChatMessage(role="tool", content='{"temp": 18}', tool_call_id="call_1"),
        common_pb2.ChatMessage(role="tool", content="14:05", tool_call_id="call_2"),
    ]
    reply = stub.Render(tokenizer_pb2.RenderRequest(model=smol.name, messages=messages, tools=_proto_tools()),
                        timeout=10)
    assert list(reply.token_ids) == smol.render_chat([USER, CALLS, *RESULTS], tools=TOOLS)
    plain = stub.Render(tokenizer_pb2.RenderRequest(model=smol.name, messages=messages[:1]), timeout=10)
    assert list(plain.token_ids) == smol.render_chat([USER])
    assert len(reply.token_ids) > len(plain.token_ids)


def test_render_over_grpc_of_a_tool_without_parameters(stub: Any, smol: ModelTokenizer) -> None:
    reply = stub.Render(tokenizer_pb2.RenderRequest(
        model=smol.name, messages=[common_pb2.ChatMessage(role="user", content="What time is it?")],
        tools=[common_pb2.Tool(name="get_time")]), timeout=10)
    system = turns(str(smol.tokenizer.decode(list(reply.token_ids), skip_special_tokens=False)))[0][1]
    expected = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                                     "properties": {}}}}
    assert json.dumps(expected) in system
