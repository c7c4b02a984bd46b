"""Chat completion bodies and chunks (`chat.completion`, `chat.completion.chunk`), with tool calls when the
request offers tools (parsed from the output: `request/tool_calls.py`)."""

from __future__ import annotations

import json
from typing import Any

from infermesh.frontend.openai.formatting import NULL_FINISH, ResponseFormat, finish, quote, usage_dict
from infermesh.frontend.request.detokenizer import TokenizerModel
from infermesh.frontend.request.output import Delta, Result
from infermesh.frontend.request.tool_calls import ParsedCall, ToolCallParser, finish_reason, parse_all
from infermesh.v1 import common_pb2


def call_dict(call: ParsedCall, index: int | None = None) -> dict[str, Any]:
    """OpenAI's tool call (with its `index` inside a streamed delta)."""
    out: dict[str, Any] = {} if index is None else {"index": index}
    out.update({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
    return out


class ChatFormat(ResponseFormat):
    object_name = "chat.completion.chunk"
    response_object = "chat.completion"

    def __init__(self, request_id: str, created: int, model: str, tokenizer: TokenizerModel, logprobs: bool,
                 tool_names: frozenset[str] | None = None) -> None:
        super().__init__(request_id, created, model, tokenizer, logprobs)
        self.parse_calls = tool_names is not None  # the request's tools, when its output is parsed for calls
        self.tool_names = tool_names or frozenset()
        self._parsers: dict[int, ToolCallParser] = {}

    def start(self, n: int) -> bytes:
        return "".join(self.head + str(i) + ',"delta":{"role":"assistant","content":""},"logprobs":null'
                       + NULL_FINISH for i in range(n)).encode()

    def chunk(self, d: Delta) -> str:
        lp = json.dumps(self.chat_logprobs(d.logprobs)) if self.logprobs and d.logprobs else "null"
        if not self.parse_calls:
            delta = '{"content":' + quote(d.text) + '}' if d.text else "{}"
            return self.head + str(d.index) + ',"delta":' + delta + ',"logprobs":' + lp + finish(d.finish_reason)
        parser = self._parsers.get(d.index)
        if parser is None:
            parser = self._parsers[d.index] = ToolCallParser(self.tool_names)
        before = parser.calls
        text, calls = parser.feed(d.text)
        if d.finish_reason:
            rest, more = parser.finish()
            text, calls = text + rest, calls + more
        fields: dict[str, Any] = {}
        if text:
            fields["content"] = text
        if calls:
            fields["tool_calls"] = [call_dict(c, before + i) for i, c in enumerate(calls)]
        delta = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        return (self.head + str(d.index) + ',"delta":' + delta + ',"logprobs":' + lp
                + finish(finish_reason(d.finish_reason, parser.calls) if d.finish_reason else ""))

    def chat_logprobs(self, items: list[common_pb2.TokenLogprob]) -> dict[str, Any]:
        tok = self.tokenizer.token_text

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = tok(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**entry(x.token_id, x.logprob),
                             "top_logprobs": [entry(t.token_id, t.logprob) for t in x.top]} for x in items]}

    def response(self, result: Result) -> dict[str, Any]:
        choices = []
        for c in result.choices:
            lp = self.chat_logprobs(c.logprobs) if self.logprobs else None
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            reason = c.finish_reason
            if self.parse_calls:
                content, calls = parse_all(c.text, self.tool_names)
                message["content"] = content
                if calls:
                    message["tool_calls"] = [call_dict(call) for call in calls]
                reason = finish_reason(reason, len(calls))
            choices.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": reason})
        return self.envelope(choices, usage=usage_dict(result.usage))
