"""Structured outputs on the real engine (SmolLM2-135M-Instruct), through the official `openai` client.

Every finished output must parse and validate: the constraint is the engine's (vLLM's xgrammar backend in
the worker), not the model's good will. Schemas are bounded (short strings, enums, small integers) so the
135M model finishes well within its token budget.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.fixtures.mesh import Mesh

pytestmark = pytest.mark.engine

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "country": {"enum": ["France", "Spain", "Italy"]},
                   "population_millions": {"type": "integer", "minimum": 0, "maximum": 40}},
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Give the capital of France as JSON."}]


class Capital(BaseModel):
    city: str = Field(max_length=12)
    country: Literal["France", "Spain", "Italy"]
    is_capital: bool


@pytest.fixture(scope="module")
def client(real_mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_mesh.base_url, api_key="unused", max_retries=0, timeout=180)


def test_parse_with_a_pydantic_model(client: openai.OpenAI, real_mesh: Mesh) -> None:
    done = client.chat.completions.parse(model=real_mesh.model, messages=ASK, response_format=Capital,
                                         temperature=0, max_tokens=60)
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Capital)
    Capital.model_validate_json(choice.message.content)


def test_json_schema_whole_and_streamed_validate(client: openai.OpenAI, real_mesh: Mesh) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    whole = client.chat.completions.create(model=real_mesh.model, messages=ASK, response_format=fmt,
                                           temperature=0, max_tokens=60)
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].message.content), CITY)
    chunks = list(client.chat.completions.create(model=real_mesh.model, messages=ASK, response_format=fmt,
                                                 temperature=0.8, seed=3, max_tokens=60, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), CITY)


def test_json_object_parses_and_n_choices_each_validate(client: openai.OpenAI, real_mesh: Mesh) -> None:
    done = client.chat.completions.create(
        model=real_mesh.model, messages=ASK, response_format={"type": "json_object"}, n=2, temperature=1.0,
        seed=11, max_tokens=40, extra_body={"min_tokens": 0})
    for choice in done.choices:
        if choice.finish_reason == "stop":  # a JSON object may be cut by max_tokens; a finished one parses
            assert isinstance(json.loads(choice.message.content), dict)
    strict = client.chat.completions.create(
        model=real_mesh.model, messages=ASK, n=2, temperature=1.0, seed=5, max_tokens=80,
        extra_body={"structured_outputs": {"json": CITY}})
    for choice in strict.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), CITY)


def test_vllm_extensions_regex_choice_and_guided(client: openai.OpenAI, real_mesh: Mesh) -> None:
    m = real_mesh.model
    regex = client.completions.create(model=m, prompt="A phone number:", max_tokens=20, temperature=0.7, seed=1,
                                      extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert re.fullmatch(r"\d{3}-\d{4}", regex.choices[0].text), regex.choices[0].text
    choice = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "Is water wet?"}],
                                            max_tokens=5, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")
    guided = client.chat.completions.create(model=m, messages=ASK, max_tokens=60, temperature=0,
                                            extra_body={"guided_json": CITY})
    jsonschema.validate(json.loads(guided.choices[0].message.content), CITY)
    grammar = client.completions.create(model=m, prompt="Say hi:", max_tokens=10,
                                        extra_body={"guided_grammar": 'root ::= "hi" | "hello"'})
    assert grammar.choices[0].text in ("hi", "hello")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
async def test_a_constraint_that_cannot_compile_is_a_400_naming_it(real_mesh: Mesh, body: dict, param: str) -> None:
    base = {"model": real_mesh.model, "messages": ASK, "max_tokens": 5, **body}
    async with httpx.AsyncClient(base_url=real_mesh.url, timeout=120) as http:
        whole = await http.post("/v1/chat/completions", json=base)
        # Streamed too, the answer is the HTTP status (the worker refuses before any token): never a 200 stream.
        streamed = await http.post("/v1/chat/completions", json={**base, "stream": True})
    for reply in (whole, streamed):
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
