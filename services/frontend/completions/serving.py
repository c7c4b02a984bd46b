"""Text completion bodies and chunks (`text_completion`)."""

from __future__ import annotations

import json
from typing import Any

from infermesh.frontend.openai.formatting import ResponseFormat, finish, quote, usage_dict
from infermesh.frontend.request.output import Delta, Result
from infermesh.v1 import common_pb2


class CompletionFormat(ResponseFormat):
    object_name = "text_completion"
    response_object = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offsets: dict[int, int] = {}

    def chunk(self, d: Delta) -> str:
        lp = json.dumps(self.completion_logprobs(d.index, d.logprobs)) if self.logprobs and d.logprobs else "null"
        return self.head + str(d.index) + ',"text":' + quote(d.text) + ',"logprobs":' + lp + finish(d.finish_reason)

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

    def response(self, result: Result) -> dict[str, Any]:
        choices = []
        for c in result.choices:
            lp = self.completion_logprobs(c.index, c.logprobs) if self.logprobs else None
            choices.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return self.envelope(choices, usage=usage_dict(result.usage))
