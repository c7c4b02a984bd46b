"""What a request's output constraint and tools must be before anything is queued, for every API alike.

`check_structured` refuses a constraint no engine could take (a schema that is
not a JSON Schema, an empty choice list, ...), naming the field it came from;
`ToolPlan` checks a chat's `tools`, `tool_choice` and `parallel_tool_calls`
and derives what the request needs of them: the tools the prompt shows, the
constraint that `required` or a named function puts on the output (a grammar
the worker builds from the tools' schemas), and whether the output is parsed
into tool calls. Whether the engine's backend compiles a constraint is the
worker's answer (`gpu_worker/vllm_engine.py: validate`), a 400 as well.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from infermesh.common.errors import InvalidRequest
from infermesh.common.tool_format import NAME_PATTERN
from infermesh.v1 import common_pb2

TOOL_CHOICE_MODES = ("none", "auto", "required", "function")


def _valid_schema(schema: Any, param: str, what: str) -> None:
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest(f"{param}: {what} must be a JSON object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)  # type: ignore[arg-type]
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InvalidRequest(f"{param}: {what} is not a valid JSON Schema: {exc.message}"
                             + (f" (at {where})" if where else ""), param=param) from None


def check_structured(structured: common_pb2.StructuredOutput, *, from_tools: bool = False) -> None:
    """Refuses a constraint that cannot be enforced as given (InvalidRequest naming its field)."""
    param = structured.param or "response_format"
    kind = structured.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest(f"{param}: the constraint is empty", param=param)
    if kind == "json_schema":
        try:
            schema = json.loads(structured.json_schema)
        except ValueError:
            raise InvalidRequest(f"{param}: the schema is not valid JSON", param=param) from None
        _valid_schema(schema, param, "the schema")
        if schema is False:
            raise InvalidRequest(f"{param}: the schema false admits no output", param=param)
    elif kind == "json_object" and not structured.json_object:
        raise InvalidRequest(f"{param}: json_object must be true when given", param=param)
    elif kind == "regex" and "\x00" in structured.regex:
        raise InvalidRequest(f"{param}: the regex must not contain a NUL character", param=param)
    elif kind == "choice" and (not structured.choice.choices or not all(structured.choice.choices)):
        raise InvalidRequest(f"{param}: choice must be a non-empty list of non-empty strings", param=param)
    elif kind == "grammar" and not structured.grammar.strip():
        raise InvalidRequest(f"{param}: the grammar must not be empty", param=param)
    elif kind == "tool_calls" and not from_tools:
        raise InvalidRequest("tool-call constraints come from tools and tool_choice", param=param)


@dataclass
class ToolPlan:
    """What a chat's tools mean for its request."""

    render: list[common_pb2.Tool] = field(default_factory=list)  # the tools the prompt shows
    structured: common_pb2.StructuredOutput | None = None  # the output's constraint (tools' or the request's)
    parse_calls: bool = False  # the output is parsed into tool calls

    @property
    def tool_names(self) -> frozenset[str] | None:
        """The names of the tools the output may call (None: the output is not parsed for calls)."""
        return frozenset(t.name for t in self.render) if self.parse_calls else None

    @classmethod
    def of(cls, tools: Sequence[common_pb2.Tool], choice: common_pb2.ToolChoice | None, parallel: bool | None,
           structured: common_pb2.StructuredOutput | None) -> ToolPlan:
        """Checks the tools (InvalidRequest naming the field) and plans the request."""
        if structured is not None:
            check_structured(structured)
        names: set[str] = set()
        for i, tool in enumerate(tools):
            _check_tool(i, tool, names)
        mode = (choice.mode if choice is not None and choice.mode else "") or ("auto" if tools else "none")
        if mode not in TOOL_CHOICE_MODES:
            raise InvalidRequest(f"tool_choice must be one of none, auto, required or a function, got {mode!r}",
                                 param="tool_choice")
        if mode == "none" or not tools:
            if mode in ("required", "function"):
                raise InvalidRequest(f"tool_choice {_choice_name(mode, choice)} requires tools", param="tool_choice")
            return cls([], structured, False)
        if mode == "auto":
            return cls(list(tools), structured, True)
        if structured is not None:
            raise InvalidRequest(f"tool_choice {_choice_name(mode, choice)} cannot be combined with "
                                 f"{structured.param}", param="tool_choice")
        if mode == "function":
            assert choice is not None
            wanted = [t for t in tools if t.name == choice.function]
            if not wanted:
                raise InvalidRequest(f"tool_choice names the function {choice.function!r}, which is not in tools",
                                     param="tool_choice")
            constraint = common_pb2.ToolCallConstraint(tools=wanted, parallel=False)
        else:
            constraint = common_pb2.ToolCallConstraint(tools=tools, parallel=parallel is not False)
        return cls(list(tools), common_pb2.StructuredOutput(tool_calls=constraint, param="tools"), True)


    def sampling(self, sampling: common_pb2.SamplingParams) -> common_pb2.SamplingParams:
        """The request's sampling parameters with the plan's constraint (a copy when it has one)."""
        if self.structured is None and not sampling.HasField("structured"):
            return sampling
        out = common_pb2.SamplingParams()
        out.CopyFrom(sampling)
        if self.structured is None:
            out.ClearField("structured")
        else:
            out.structured.CopyFrom(self.structured)
        return out


def _choice_name(mode: str, choice: common_pb2.ToolChoice | None) -> str:
    return f"function {choice.function!r}" if mode == "function" and choice is not None else repr(mode)


def _check_tool(i: int, tool: common_pb2.Tool, names: set[str]) -> None:
    if not NAME_PATTERN.fullmatch(tool.name):
        raise InvalidRequest(f"tools[{i}].function.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -, "
                             f"got {tool.name!r}", param=f"tools[{i}].function.name")
    if tool.name in names:
        raise InvalidRequest(f"tools[{i}].function.name: {tool.name!r} is given twice",
                             param=f"tools[{i}].function.name")
    names.add(tool.name)
    if not tool.parameters:
        return
    param = f"tools[{i}].function.parameters"
    try:
        schema = json.loads(tool.parameters)
    except ValueError:
        raise InvalidRequest(f"{param} is not valid JSON", param=param) from None
    _valid_schema(schema, param, "the parameters")
    if isinstance(schema, dict) and schema.get("type", "object") != "object":
        raise InvalidRequest(f"{param}: the arguments must be an object (type \"object\")", param=param)
