"""The tool calls in a model's output, parsed as it streams (the mesh's one format: `common.tool_format`).

`ToolCallParser.feed` takes one choice's new text and returns what of it is
content and which calls were completed by it; text that may still be the
start of a call (`<tool_c`) is held back until it is known. A call's JSON that
does not parse as `{"name", "arguments": {...}}`, or names no tool of the
request, is returned as content, never dropped. Content that is only white space around calls is dropped, as
OpenAI's responses have none.

Small models often answer with the call's JSON alone, without the tags (Qwen2.5-
Coder-0.5B does): an output that is, whole, one such object naming one of the
request's tools is that call too. An output that starts with `{` is therefore
held until it ends (or is known to be something else).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from infermesh.common.tool_format import CALL_END, CALL_START


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def finish_reason(reason: str, calls: int) -> str:
    """A choice that ended (not cut off) after calling tools finished with `tool_calls`."""
    return "tool_calls" if calls and reason == "stop" else reason


def _held_prefix(text: str, token: str) -> int:
    """How many characters at the end of `text` could begin `token`."""
    for size in range(min(len(token) - 1, len(text)), 0, -1):
        if token.startswith(text[-size:]):
            return size
    return 0


class ToolCallParser:
    def __init__(self, names: frozenset[str] = frozenset()) -> None:
        self._names = names  # the request's tools: a bare JSON call must name one
        self._buffer = ""
        self._inside = False
        self._space = ""  # white space held until it is known not to sit between calls
        self._bare: list[str] | None = [] if names else None  # the output so far, while it may be a bare call
        self.calls = 0  # calls parsed so far

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        if self._bare is not None:
            self._bare.append(text)
            held = "".join(self._bare).lstrip()
            if not held or (held.startswith("{") and CALL_START not in held):
                return "", []
            text, self._bare = "".join(self._bare), None  # not a bare call: parse it as any output
        self._buffer += text
        content: list[str] = []
        calls: list[ParsedCall] = []
        while True:
            if not self._inside:
                start = self._buffer.find(CALL_START)
                if start < 0:
                    keep = _held_prefix(self._buffer, CALL_START)
                    self._content(self._buffer[:len(self._buffer) - keep], content, before_call=keep > 0)
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                self._content(self._buffer[:start], content, before_call=True)
                self._buffer = self._buffer[start + len(CALL_START):]
                self._inside = True
            end = self._buffer.find(CALL_END)
            if end < 0:
                break
            body, self._buffer = self._buffer[:end], self._buffer[end + len(CALL_END):]
            self._inside = False
            call = _parse(body)
            if call is None or (self._names and call.name not in self._names):  # not a call of a tool offered
                self._content(CALL_START + body + CALL_END, content)
            else:
                calls.append(call)
                self.calls += 1
                self._space = ""  # white space before a call is not content
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """The rest at the end of the output: an unfinished call, or a held prefix, is content."""
        if self._bare is not None:
            whole, self._bare = "".join(self._bare), None
            call = _parse(whole.strip())
            if call is not None and call.name in self._names:
                self.calls += 1
                return "", [call]
            content, calls = self.feed(whole)
            rest, more = self.finish()
            return content + rest, calls + more
        rest = (CALL_START if self._inside else "") + self._buffer
        self._buffer, self._inside = "", False
        out: list[str] = []
        self._content(rest, out)
        if not self.calls and self._space:
            out.append(self._space)
        self._space = ""
        return "".join(out), []

    def _content(self, text: str, out: list[str], before_call: bool = False) -> None:
        """Emits content; white space that may sit between content and a call (or between calls) is held
        in `_space` until what follows it is known."""
        if not text:
            return
        trailing = ""
        if before_call:
            stripped = text.rstrip()
            text, trailing = stripped, text[len(stripped):]
        if not text.strip():
            self._space += text + trailing
            return
        out.append(self._space + text)
        self._space = trailing


def _parse(body: str) -> ParsedCall | None:
    try:
        value: Any = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_all(text: str, names: frozenset[str] = frozenset()) -> tuple[str | None, list[ParsedCall]]:
    """A whole output's content (None when it is only calls) and calls."""
    parser = ToolCallParser(names)
    content, calls = parser.feed(text)
    rest, more = parser.finish()
    content, calls = content + rest, calls + more
    content = content.strip() if calls else content
    return (content or None) if calls else content, calls
