"""The structured-output fields of a request, as OpenAI and vLLM's server name them, into one `StructuredOutput`.

OpenAI's `response_format` (`text`, `json_object`, `json_schema` with `name`,
`schema`, `strict`); vLLM's `structured_outputs` (`json`, `regex`, `choice`,
`grammar`, `json_object`); and vLLM's older `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`. At most one of them may constrain a
request. What a constraint must be to reach a worker (a schema that is a valid
JSON Schema, a non-empty choice list, ...) is `request.constraints.check_structured`,
which the gRPC API's constraints pass through too; whether the engine's
backend can compile it is the worker's answer, a 400 naming the same field.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from infermesh.common.errors import InvalidRequest
from infermesh.frontend.openai.protocol import OpenAIModel
from infermesh.v1 import common_pb2
from pydantic import BaseModel, ConfigDict, Field


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(default="response", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatParam(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParam(OpenAIModel):
    """vLLM's `structured_outputs` (one of its constraints)."""

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(OpenAIModel):
    """The fields of chat and completions that constrain the output."""

    response_format: ResponseFormatParam | None = None
    structured_outputs: StructuredOutputsParam | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured(self) -> common_pb2.StructuredOutput | None:
        """The request's constraint (None: free text); InvalidRequest when two fields constrain it."""
        found: list[common_pb2.StructuredOutput] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(common_pb2.StructuredOutput(json_object=True, param="response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidRequest("response_format: json_schema requires json_schema.schema",
                                     param="response_format")
            found.append(_schema(rf.json_schema.schema_, "response_format"))
        so = self.structured_outputs
        if so is not None:
            given = [name for name in ("json_", "regex", "choice", "grammar", "json_object")
                     if getattr(so, name) is not None]
            if len(given) != 1:
                raise InvalidRequest("structured_outputs must set exactly one of json, regex, choice, grammar, "
                                     "json_object", param="structured_outputs")
            found.append(_one(given[0].rstrip("_"), getattr(so, given[0]), "structured_outputs"))
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(self, "guided_" + name)
            if value is not None:
                found.append(_one(name, value, "guided_" + name))
        if len(found) > 1:
            names = ", ".join(s.param for s in found)
            raise InvalidRequest(f"only one structured output constraint may be given, got {names}",
                                 param=found[1].param)
        return found[0] if found else None

    @property
    def structured_response(self) -> bool:
        """Whether the request asks for a structured response (what a catalog route's rules read)."""
        return self.structured() is not None


def _schema(schema: Any, param: str) -> common_pb2.StructuredOutput:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise InvalidRequest(f"{param}: the schema is not valid JSON", param=param) from None
    if schema is True or schema == {}:
        schema = {}
    return common_pb2.StructuredOutput(json_schema=json.dumps(schema, ensure_ascii=False), param=param)


def _one(kind: str, value: Any, param: str) -> common_pb2.StructuredOutput:
    if kind == "json":
        return _schema(value, param)
    if kind == "json_object":
        if value is not True:
            raise InvalidRequest(f"{param}: json_object must be true when given", param=param)
        return common_pb2.StructuredOutput(json_object=True, param=param)
    if kind == "regex":
        return common_pb2.StructuredOutput(regex=value, param=param)
    if kind == "choice":
        return common_pb2.StructuredOutput(choice=common_pb2.ChoiceList(choices=value), param=param)
    return common_pb2.StructuredOutput(grammar=value, param=param)
