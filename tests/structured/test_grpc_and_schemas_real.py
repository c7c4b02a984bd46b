"""Structured outputs and tools over the public gRPC API, and generated schemas whose outputs always validate.

The property test draws JSON schemas (objects of bounded strings, integers in ranges, enums, booleans,
short arrays, nested objects) with hypothesis and sends each, through the HTTP API, to the real engine at
a sampling temperature: whatever the model would say, the finished output validates.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from infermesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from tests.fixtures.mesh import Mesh

pytestmark = pytest.mark.engine

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15}},
           "required": ["city"], "additionalProperties": False}
ASK = [common_pb2.ChatMessage(role="user", content="What is the weather in Oslo?")]


async def _collect(stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.GenerateRequest
                   ) -> tuple[str, list[common_pb2.ToolCall], str]:
    text, calls, finish = "", [], ""
    async for chunk in stub.Generate(request, timeout=120):
        text += chunk.text
        calls += list(chunk.tool_calls)
        finish = chunk.finish_reason or finish
    return text, calls, finish


async def test_grpc_structured_output_and_tool_calls(real_mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(real_mesh.frontend.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
        sampling = common_pb2.SamplingParams(max_tokens=30, temperature=0, structured=common_pb2.StructuredOutput(
            json_schema=json.dumps(schema)))
        text, calls, finish = await _collect(stub, inference_pb2.GenerateRequest(
            model=real_mesh.model, messages=[common_pb2.ChatMessage(role="user", content="Is it raining?")],
            sampling=sampling))
        assert finish == "stop" and not calls
        jsonschema.validate(json.loads(text), schema)

        tools = [common_pb2.Tool(name="get_weather", description="The weather now.", parameters=json.dumps(WEATHER))]
        text, calls, finish = await _collect(stub, inference_pb2.GenerateRequest(
            model=real_mesh.model, messages=ASK, tools=tools, tool_choice=common_pb2.ToolChoice(mode="required"),
            sampling=common_pb2.SamplingParams(max_tokens=200, temperature=0.5, seed=3)))  # up to 8 calls
        assert finish == "tool_calls" and len(calls) >= 1 and not text.strip()
        for call in calls:
            assert call.name == "get_weather" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.arguments), WEATHER)

        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await _collect(stub, inference_pb2.GenerateRequest(
                model=real_mesh.model, messages=ASK, sampling=common_pb2.SamplingParams(
                    max_tokens=5, structured=common_pb2.StructuredOutput(regex="(unclosed"))))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await _collect(stub, inference_pb2.GenerateRequest(
                model=real_mesh.model, messages=ASK, tools=tools,
                tool_choice=common_pb2.ToolChoice(mode="function", function="nope")))
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in unknown.value.details()


# -- generated schemas ------------------------------------------------------------------------------
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
LEAVES = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 8)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.just({"type": "boolean"}),
    st.builds(lambda xs: {"enum": xs}, st.lists(st.sampled_from(["red", "green", "blue", 1, 2, True, None]),
                                                min_size=1, max_size=4, unique=True)),
)


def _objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def build(props: dict[str, dict[str, Any]], required: list[bool]) -> dict[str, Any]:
        names = list(props)
        return {"type": "object", "properties": props, "additionalProperties": False,
                "required": [n for n, r in zip(names, required, strict=False) if r]}
    return st.builds(build, st.dictionaries(NAMES, children, min_size=1, max_size=3),
                     st.lists(st.booleans(), min_size=3, max_size=3))


SCHEMAS = _objects(st.recursive(
    LEAVES, lambda inner: st.one_of(
        st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, inner, st.integers(0, 2)),
        _objects(inner)), max_leaves=4))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 10_000))
def test_generated_schemas_always_validate(real_mesh: Mesh, schema: dict[str, Any], seed: int) -> None:
    jsonschema.validators.validator_for(schema).check_schema(schema)
    body = {"model": real_mesh.model, "max_tokens": 200, "temperature": 1.0, "seed": seed,
            "messages": [{"role": "user", "content": "Fill in this JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "generated", "schema": schema}}}
    reply = httpx.post(real_mesh.url + "/v1/chat/completions", json=body, timeout=180)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    # A string may be cut by max_tokens (finish "length"); every finished output must validate.
    if choice["finish_reason"] == "stop":
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    else:
        assert choice["finish_reason"] == "length"
