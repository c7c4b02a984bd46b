"""OpenAI response bodies and SSE chunks, from plain results: what chat and completions share.

Chunks are assembled from pre-encoded JSON fragments: the per-token path
builds no pydantic models and encodes only the new text. A format takes plain
values (`Delta`, `Usage`, `Result` from the output buffer), never a live request.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring
from typing import Any

from infermesh.frontend.request.detokenizer import TokenizerModel
from infermesh.frontend.request.output import Delta, Result, Usage

NULL_FINISH = ',"finish_reason":null}]}\n\n'


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def finish(reason: str) -> str:
    return ',"finish_reason":"' + reason + '"}]}\n\n' if reason else NULL_FINISH


def quote(text: str) -> str:
    return str(encode_basestring(text))


class ResponseFormat:
    """One response's envelope (id, object, created, model); subclasses add their choices."""

    object_name = ""
    response_object = ""

    def __init__(self, request_id: str, created: int, model: str, tokenizer: TokenizerModel,
                 logprobs: bool) -> None:
        self.id = request_id
        self.created = created
        self.logprobs = logprobs
        self.retarget(model, tokenizer)

    def retarget(self, model: str, tokenizer: TokenizerModel) -> None:
        """The model that produces the response (another one after a fallback before the first token)."""
        self.model = model
        self.tokenizer = tokenizer
        self.head = ('data: {"id":' + quote(self.id) + ',"object":"' + self.object_name +
                     '","created":' + str(self.created) + ',"model":' + quote(model) + ',"choices":[{"index":')

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.response_object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def usage_chunk(self, usage: Usage) -> bytes:
        body = {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [], "usage": usage_dict(usage)}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def start(self, n: int) -> bytes:
        return b""

    def chunks(self, deltas: list[Delta]) -> bytes:
        return "".join([self.chunk(d) for d in deltas]).encode()

    def chunk(self, delta: Delta) -> str:
        raise NotImplementedError

    def response(self, result: Result) -> dict[str, Any]:
        raise NotImplementedError
