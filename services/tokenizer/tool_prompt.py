"""The mesh's own tool prompt, for models whose chat template takes no `tools` (SmolLM2-135M-Instruct's).

A conversation with tools, or with earlier tool calls and results, is rewritten
into plain system / user / assistant messages the template can render: the
tools and how to call them in a system message (the wording of Qwen2.5's
template, whose `<tool_call>` format is the mesh's one format,
`infermesh.common.tool_format`), an assistant turn's calls as the text of
those calls, and `tool` results as a user turn of `<tool_response>` blocks.
A template that takes tools gets them, and the messages, as they are.
"""

from __future__ import annotations

import json
from typing import Any

from infermesh.common.tool_format import CALL_END, CALL_START, call_text

RESPONSE_START = "<tool_response>"
RESPONSE_END = "</tool_response>"


def instructions(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f"{CALL_START}{CALL_END} XML tags:\n{CALL_START}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n' + CALL_END)


def rewrite(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation in roles and text a template without tool support renders."""
    out: list[dict[str, Any]] = []
    rest = messages
    if tools:
        if messages and messages[0]["role"] == "system":
            given = messages[0]["content"]
            system = (given + "\n\n" if given.strip() else "") + instructions(tools)
            rest = messages[1:]
        else:
            system = instructions(tools)
        out.append({"role": "system", "content": system})
    for message in rest:
        role = message["role"]
        if role == "tool":
            block = f"{RESPONSE_START}\n{message['content']}\n{RESPONSE_END}"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        if role == "assistant" and message.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
            text = "\n".join(([message["content"]] if message.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
            continue
        out.append({k: v for k, v in message.items() if k in ("role", "content", "name")})
    for message in out:
        message.pop("_tool_results", None)
    return out
