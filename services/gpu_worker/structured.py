"""A request's output constraint (`SamplingParams.structured`) as the engine's structured-output backend takes it.

`vllm_fields` turns the mesh's `StructuredOutput` into the fields of vLLM's
`StructuredOutputsParams` (`json`, `json_object`, `regex`, `choice`,
`grammar`): the first attempt of a request runs under vLLM's own backend with
them, and a resumed one under `grammar_replay.GrammarReplay` with the same
fields, so both compile the same grammar.

The calls that tool_choice `required` or a named function demands are a
grammar built here from the tools' parameter schemas, in the mesh's one
tool-call format (`infermesh.common.tool_format`): one call of a listed tool
(or, with parallel calls, up to `MAX_PARALLEL_CALLS`), each with arguments
valid against that tool's schema. JSON inside tool calls is compact (no free
whitespace), so a small model cannot wander off into blank space.
"""

from __future__ import annotations

import json
from typing import Any

from infermesh.common.errors import InvalidRequest
from infermesh.common.tool_format import CALL_SEPARATOR, CALL_SUFFIX, MAX_PARALLEL_CALLS, call_prefix
from infermesh.v1 import common_pb2


def vllm_fields(structured: common_pb2.StructuredOutput) -> dict[str, Any]:
    """The StructuredOutputsParams fields for a constraint; InvalidRequest (naming its param) when a tool's
    schema cannot become a grammar."""
    kind = structured.WhichOneof("kind")
    if kind == "json_schema":
        return {"json": structured.json_schema}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "regex":
        return {"regex": structured.regex}
    if kind == "choice":
        return {"choice": list(structured.choice.choices)}
    if kind == "grammar":
        return {"grammar": structured.grammar}
    if kind == "tool_calls":
        return {"grammar": tool_call_grammar(structured.tool_calls, structured.param or "tools")}
    raise InvalidRequest("the structured output constraint is empty", param=structured.param or "response_format")


def tool_call_grammar(constraint: common_pb2.ToolCallConstraint, param: str = "tools") -> str:
    """An EBNF grammar (xgrammar's dialect, which vLLM's xgrammar backend compiles) of the calls allowed."""
    import xgrammar as xgr

    if not constraint.tools:
        raise InvalidRequest("tool_choice requires a call, but no tools were given", param="tool_choice")
    calls = []
    for i, tool in enumerate(constraint.tools):
        schema = tool.parameters or '{"type": "object"}'
        try:
            arguments = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the reason
            raise InvalidRequest(f"tools[{i}].function.parameters cannot be enforced: {_reason(exc)}",
                                 param=f"tools[{i}].function.parameters") from None
        calls.append(xgr.Grammar.concat(_literal(xgr, call_prefix(tool.name)), arguments,
                                        _literal(xgr, CALL_SUFFIX)))
    one = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    if not constraint.parallel:
        return str(one)
    # One call or more: the single call's rules under another name, then a root that repeats it.
    lines = str(one).splitlines()
    assert lines[0].startswith("root ::= "), lines[0]
    body = "tool_call ::= " + lines[0][len("root ::= "):]
    more = MAX_PARALLEL_CALLS - 1
    root = f'root ::= tool_call ({json.dumps(CALL_SEPARATOR)} tool_call){{0,{more}}}'
    return "\n".join([root, body, *lines[1:]])


def _literal(xgr: Any, text: str) -> Any:
    return xgr.Grammar.from_ebnf("root ::= " + json.dumps(text))


def _reason(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
