"""A request's output constraint and tools, checked before anything is queued: every field, every refusal.

`StructuredFields.structured()` (reached by parsing chat and completions bodies) and
`ToolPlan.of` / `check_structured` (reached the same way, and by the gRPC API with protos).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from infermesh.common.errors import InvalidRequest
from infermesh.frontend.chat.protocol import ChatCompletionRequest
from infermesh.frontend.completions.protocol import CompletionRequest
from infermesh.frontend.openai.protocol import parse
from infermesh.frontend.request.constraints import ToolPlan, check_structured
from infermesh.v1 import common_pb2

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def chat(**fields: Any) -> ChatCompletionRequest:
    return parse(ChatCompletionRequest, {"model": "m", "messages": MESSAGES, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return parse(CompletionRequest, {"model": "m", "prompt": "Say hi", **fields})


def tool(name: str, parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": f"{name} tool"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


TOOLS = [tool("get_weather", WEATHER), tool("get_time", {"type": "object", "properties": {}})]


def refused(call: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        call()
    return info.value


# ---- structured-output fields ------------------------------------------------------------------

def test_no_constraint_or_text_is_free_text() -> None:
    assert chat().structured() is None
    assert chat(response_format={"type": "text"}).structured() is None
    assert completion().structured() is None


def test_json_object() -> None:
    s = chat(response_format={"type": "json_object"}).structured()
    assert s.WhichOneof("kind") == "json_object" and s.json_object and s.param == "response_format"


@pytest.mark.parametrize("make", [chat, completion])
def test_json_schema_is_carried_as_json_text(make: Any) -> None:
    body = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    s = make(response_format=body).structured()
    assert s.WhichOneof("kind") == "json_schema" and s.param == "response_format"
    assert json.loads(s.json_schema) == WEATHER
    check_structured(s)


def test_an_invalid_json_schema_is_a_400_naming_response_format() -> None:
    req = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    err = refused(req.tool_plan)
    assert err.param == "response_format" and "not a valid JSON Schema" in err.message and "type" in err.message
    err = refused(lambda: ToolPlan.of((), None, None, completion(
        response_format={"type": "json_schema", "json_schema": {"schema": {"minLength": -1}}}).structured()))
    assert err.param == "response_format"


@pytest.mark.parametrize("json_schema", [None, {"name": "x"}])
def test_json_schema_without_a_schema_is_refused(json_schema: Any) -> None:
    body = {"type": "json_schema"} if json_schema is None else {"type": "json_schema", "json_schema": json_schema}
    err = refused(chat(response_format=body).structured)
    assert err.param == "response_format" and "json_schema.schema" in err.message


@pytest.mark.parametrize("value", [WEATHER, json.dumps(WEATHER)])
def test_structured_outputs_json_as_dict_or_text(value: Any) -> None:
    s = chat(structured_outputs={"json": value}).structured()
    assert s.param == "structured_outputs" and json.loads(s.json_schema) == WEATHER


@pytest.mark.parametrize(("field", "value", "kind", "check"), [
    ("regex", r"\d{3}", "regex", lambda s: s.regex == r"\d{3}"),
    ("choice", ["yes", "no"], "choice", lambda s: list(s.choice.choices) == ["yes", "no"]),
    ("grammar", 'root ::= "a" | "b"', "grammar", lambda s: s.grammar == 'root ::= "a" | "b"'),
    ("json_object", True, "json_object", lambda s: s.json_object),
])
def test_structured_outputs_kinds(field: str, value: Any, kind: str, check: Any) -> None:
    s = completion(structured_outputs={field: value}).structured()
    assert s.WhichOneof("kind") == kind and s.param == "structured_outputs" and check(s)
    check_structured(s)


@pytest.mark.parametrize("body", [{}, {"regex": "a", "choice": ["a"]}, {"json": WEATHER, "grammar": "root ::= x"}])
def test_structured_outputs_needs_exactly_one_field(body: dict[str, Any]) -> None:
    err = refused(chat(structured_outputs=body).structured)
    assert err.param == "structured_outputs" and "exactly one" in err.message


def test_structured_outputs_json_object_false_is_refused() -> None:
    assert refused(chat(structured_outputs={"json_object": False}).structured).param == "structured_outputs"


@pytest.mark.parametrize(("field", "value", "kind"), [
    ("guided_json", WEATHER, "json_schema"),
    ("guided_json", json.dumps(WEATHER), "json_schema"),
    ("guided_regex", "[a-z]+", "regex"),
    ("guided_choice", ["red", "blue"], "choice"),
    ("guided_grammar", 'root ::= "x"', "grammar"),
])
def test_guided_fields_carry_their_own_param(field: str, value: Any, kind: str) -> None:
    s = chat(**{field: value}).structured()
    assert s.WhichOneof("kind") == kind and s.param == field
    check_structured(s)


@pytest.mark.parametrize(("field", "value"), [
    ("guided_json", "{not json"),
    ("guided_json", {"type": 12}),
    ("guided_choice", []),
    ("guided_choice", ["a", ""]),
    ("guided_regex", "a\x00b"),
    ("guided_grammar", "   "),
])
def test_bad_guided_fields_are_400s_naming_them(field: str, value: Any) -> None:
    req = completion(**{field: value})
    err = refused(lambda: ToolPlan.of((), None, None, req.structured()))
    assert err.param == field and err.message.startswith(field)


@pytest.mark.parametrize(("fields", "second"), [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"]}, "guided_json": WEATHER}, "guided_json"),
    ({"guided_json": WEATHER, "guided_choice": ["a"]}, "guided_choice"),
])
def test_two_constraints_are_a_400_naming_the_second(fields: dict[str, Any], second: str) -> None:
    err = refused(chat(**fields).structured)
    assert err.param == second and "only one" in err.message


def test_check_structured_refuses_empty_and_client_tool_call_constraints() -> None:
    assert refused(lambda: check_structured(common_pb2.StructuredOutput(param="guided_json"))).param == "guided_json"
    assert refused(lambda: check_structured(common_pb2.StructuredOutput(json_object=False))).param == "response_format"
    calls = common_pb2.StructuredOutput(tool_calls=common_pb2.ToolCallConstraint(), param="tools")
    assert refused(lambda: check_structured(calls)).param == "tools"
    check_structured(calls, from_tools=True)
    assert refused(lambda: check_structured(common_pb2.StructuredOutput(json_schema="[1,"))).param == "response_format"


# ---- tools --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("tools", "param", "words"), [
    ([tool("get weather")], "tools[0].function.name", "a-z"),
    ([tool("x" * 65)], "tools[0].function.name", "1-64"),
    ([tool("get_weather"), tool("")], "tools[1].function.name", "1-64"),
    ([tool("f"), tool("g"), tool("f")], "tools[2].function.name", "given twice"),
    ([tool("f", {"type": "array", "items": {}})], "tools[0].function.parameters", 'type "object"'),
    ([tool("f", {"type": "string"})], "tools[0].function.parameters", 'type "object"'),
    ([tool("g"), tool("f", {"type": "object", "properties": {"a": {"type": "bogus"}}})],
     "tools[1].function.parameters", "not a valid JSON Schema"),
])
def test_bad_tools_are_400s_naming_the_field(tools: list[dict[str, Any]], param: str, words: str) -> None:
    err = refused(chat(tools=tools).tool_plan)
    assert err.param == param and words in err.message


def test_tool_parameters_that_are_not_a_json_object_are_refused() -> None:
    for text, words in (("[1, 2]", "must be a JSON object"), ("{oops", "not valid JSON")):
        err = refused(lambda t=text: ToolPlan.of([common_pb2.Tool(name="f", parameters=t)], None, None, None))
        assert err.param == "tools[0].function.parameters" and words in err.message


def test_parameters_without_a_type_or_none_at_all_are_an_object() -> None:
    plan = chat(tools=[tool("f", {"properties": {"a": {"type": "string"}}}), tool("g")]).tool_plan()
    assert [t.name for t in plan.render] == ["f", "g"] and plan.render[1].parameters == ""


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    err = refused(chat(tools=[tool("get_weather\n", WEATHER)]).tool_plan)
    assert err.param == "tools[0].function.name"


# ---- tool_choice and parallel_tool_calls ---------------------------------------------------------

def test_auto_is_the_default_with_tools() -> None:
    for fields in ({}, {"tool_choice": "auto"}):
        plan = chat(tools=TOOLS, **fields).tool_plan()
        assert [t.name for t in plan.render] == ["get_weather", "get_time"]
        assert plan.structured is None and plan.parse_calls
        assert plan.tool_names == frozenset({"get_weather", "get_time"})


def test_auto_keeps_the_requests_own_constraint() -> None:
    plan = chat(tools=TOOLS, response_format={"type": "json_object"}).tool_plan()
    assert plan.structured is not None and plan.structured.json_object and plan.parse_calls


def test_none_hides_the_tools_and_parses_no_calls() -> None:
    plan = chat(tools=TOOLS, tool_choice="none").tool_plan()
    assert plan.render == [] and not plan.parse_calls and plan.tool_names is None and plan.structured is None
    plan = chat(tools=TOOLS, tool_choice="none", guided_regex="a+").tool_plan()
    assert plan.structured is not None and plan.structured.regex == "a+" and plan.render == []


def test_no_tools_means_no_calls() -> None:
    for fields in ({}, {"tool_choice": "auto"}, {"tool_choice": "none"}, {"tools": []}):
        plan = chat(**fields).tool_plan()
        assert plan.render == [] and plan.tool_names is None


@pytest.mark.parametrize(("parallel", "expected"), [(None, True), (True, True), (False, False)])
def test_required_constrains_the_output_to_calls_of_every_tool(parallel: bool | None, expected: bool) -> None:
    plan = chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel).tool_plan()
    s = plan.structured
    assert s is not None and s.WhichOneof("kind") == "tool_calls" and s.param == "tools"
    assert [t.name for t in s.tool_calls.tools] == ["get_weather", "get_time"]
    assert s.tool_calls.parallel is expected
    assert json.loads(s.tool_calls.tools[0].parameters) == WEATHER
    assert plan.parse_calls and len(plan.render) == 2
    check_structured(s, from_tools=True)


def test_a_named_function_constrains_to_one_call_of_it() -> None:
    plan = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                parallel_tool_calls=True).tool_plan()
    s = plan.structured
    assert s is not None and [t.name for t in s.tool_calls.tools] == ["get_time"] and s.tool_calls.parallel is False
    assert [t.name for t in plan.render] == ["get_weather", "get_time"]  # the prompt still shows every tool
    assert plan.tool_names == frozenset({"get_weather", "get_time"})


@pytest.mark.parametrize(("fields", "words"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "not in tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "requires tools"),
    ({"tool_choice": "required"}, "requires tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}},
      "guided_choice": ["a"]}, "guided_choice"),
])
def test_bad_tool_choices_are_400s_naming_tool_choice(fields: dict[str, Any], words: str) -> None:
    err = refused(chat(**fields).tool_plan)
    assert err.param == "tool_choice" and words in err.message


def test_an_unknown_mode_from_the_grpc_api_is_refused() -> None:
    tools = [common_pb2.Tool(name="f")]
    err = refused(lambda: ToolPlan.of(tools, common_pb2.ToolChoice(mode="always"), None, None))
    assert err.param == "tool_choice" and "'always'" in err.message
    assert ToolPlan.of(tools, common_pb2.ToolChoice(), None, None).parse_calls  # an empty mode is the default


# ---- sampling ------------------------------------------------------------------------------------

def _sampling(structured: common_pb2.StructuredOutput | None = None) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(max_tokens=32, temperature=0.5, stop=["\n\n"])
    if structured is not None:
        params.structured.CopyFrom(structured)
    return params


def test_sampling_puts_the_constraint_in_a_copy() -> None:
    plan = chat(tools=TOOLS, tool_choice="required").tool_plan()
    given = _sampling()
    before = given.SerializeToString()
    out = plan.sampling(given)
    assert out is not given and given.SerializeToString() == before and not given.HasField("structured")
    assert out.structured == plan.structured and out.max_tokens == 32 and list(out.stop) == ["\n\n"]
    assert abs(out.temperature - 0.5) < 1e-6


def test_sampling_replaces_and_clears_a_constraint_without_touching_the_input() -> None:
    old = common_pb2.StructuredOutput(regex="x", param="guided_regex")
    plan = chat(response_format={"type": "json_object"}).tool_plan()
    given = _sampling(old)
    out = plan.sampling(given)
    assert out.structured.json_object and out.structured.param == "response_format"
    assert given.structured == old
    free = chat().tool_plan().sampling(given)
    assert not free.HasField("structured") and free.max_tokens == 32 and given.structured == old


def test_sampling_without_any_constraint_is_the_input() -> None:
    given = _sampling()
    assert chat(tools=TOOLS).tool_plan().sampling(given) == given


def test_the_schema_false_is_refused() -> None:
    err = refused(chat(guided_json=False).tool_plan)
    assert err.param == "guided_json"
