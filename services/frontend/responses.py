"""OpenAI response bodies and SSE chunks for chat and completions.

Chunks are assembled from pre-encoded JSON fragments: the per-token path
builds no pydantic models and encodes only the new text.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

from infermesh.frontend.detokenizer import TokenizerModel
from infermesh.frontend.generation import Delta, Generation
from infermesh.v1 import common_pb2

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
_NULL_FINISH = ',"finish_reason":null}]}\n\n'


def usage_dict(gen: Generation) -> dict[str, Any]:
    completion = gen.completion_tokens
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": completion,
            "total_tokens": gen.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": gen.cached_tokens}}


def _finish(reason: str) -> str:
    return ',"finish_reason":"' + reason + '"}]}\n\n' if reason else _NULL_FINISH


class _Format:
    object_name = ""
    response_object = ""

    def __init__(self, request_id: str, created: int, model: str, tokenizer: TokenizerModel,
                 logprobs: bool) -> None:
        self.id = request_id
        self.created = created
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self._head = ('data: {"id":' + encode_basestring(request_id) + ',"object":"' + self.object_name +
                      '","created":' + str(created) + ',"model":' + encode_basestring(model) +
                      ',"choices":[{"index":')

    def _envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.response_object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def usage_chunk(self, gen: Generation) -> bytes:
        body = {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [], "usage": usage_dict(gen)}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def start(self, n: int) -> bytes:
        return b""

    def chunks(self, deltas: list[Delta]) -> bytes:
        return "".join([self.chunk(d) for d in deltas]).encode()

    def chunk(self, delta: Delta) -> str:
        raise NotImplementedError


class ChatFormat(_Format):
    object_name = "chat.completion.chunk"
    response_object = "chat.completion"

    def start(self, n: int) -> bytes:
        return "".join(self._head + str(i) + ',"delta":{"role":"assistant","content":""},"logprobs":null'
                       + _NULL_FINISH for i in range(n)).encode()

    def chunk(self, d: Delta) -> str:
        delta = '{"content":' + encode_basestring(d.text) + '}' if d.text else "{}"
        lp = json.dumps(self.chat_logprobs(d.logprobs)) if self.logprobs and d.logprobs else "null"
        return self._head + str(d.index) + ',"delta":' + delta + ',"logprobs":' + lp + _finish(d.finish_reason)

    def chat_logprobs(self, items: list[common_pb2.TokenLogprob]) -> dict[str, Any]:
        tok = self.tokenizer.token_text

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = tok(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**entry(x.token_id, x.logprob),
                             "top_logprobs": [entry(t.token_id, t.logprob) for t in x.top]} for x in items]}

    def response(self, gen: Generation, logprobs: dict[int, list[common_pb2.TokenLogprob]]) -> dict[str, Any]:
        choices = []
        for c in gen.choices:
            lp = self.chat_logprobs(logprobs.get(c.index, [])) if self.logprobs else None
            choices.append({"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                            "logprobs": lp, "finish_reason": c.finish_reason or "stop"})
        return self._envelope(choices, usage=usage_dict(gen))


class CompletionFormat(_Format):
    object_name = "text_completion"
    response_object = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offsets: dict[int, int] = {}

    def chunk(self, d: Delta) -> str:
        lp = json.dumps(self.completion_logprobs(d.index, d.logprobs)) if self.logprobs and d.logprobs else "null"
        return (self._head + str(d.index) + ',"text":' + encode_basestring(d.text) + ',"logprobs":' + lp +
                _finish(d.finish_reason))

    def completion_logprobs(self, index: int, items: list[common_pb2.TokenLogprob]) -> dict[str, Any]:
        tok = self.tokenizer.token_text
        offset = self._offsets.get(index, 0)
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for x in items:
            text = tok(x.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(x.logprob)
            out["top_logprobs"].append({tok(t.token_id): t.logprob for t in x.top})
            out["text_offset"].append(offset)
            offset += len(text)
        self._offsets[index] = offset
        return out

    def response(self, gen: Generation, logprobs: dict[int, list[common_pb2.TokenLogprob]]) -> dict[str, Any]:
        choices = []
        for c in gen.choices:
            lp = self.completion_logprobs(c.index, logprobs.get(c.index, [])) if self.logprobs else None
            choices.append({"index": c.index, "text": "".join(c.text), "logprobs": lp,
                            "finish_reason": c.finish_reason or "stop"})
        return self._envelope(choices, usage=usage_dict(gen))
