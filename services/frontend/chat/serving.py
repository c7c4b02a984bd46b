"""Chat completion bodies and chunks (`chat.completion`, `chat.completion.chunk`)."""

from __future__ import annotations

import json
from typing import Any

from infermesh.frontend.openai.formatting import NULL_FINISH, ResponseFormat, finish, quote, usage_dict
from infermesh.frontend.request.output import Delta, Result
from infermesh.v1 import common_pb2


class ChatFormat(ResponseFormat):
    object_name = "chat.completion.chunk"
    response_object = "chat.completion"

    def start(self, n: int) -> bytes:
        return "".join(self.head + str(i) + ',"delta":{"role":"assistant","content":""},"logprobs":null'
                       + NULL_FINISH for i in range(n)).encode()

    def chunk(self, d: Delta) -> str:
        delta = '{"content":' + quote(d.text) + '}' if d.text else "{}"
        lp = json.dumps(self.chat_logprobs(d.logprobs)) if self.logprobs and d.logprobs else "null"
        return self.head + str(d.index) + ',"delta":' + delta + ',"logprobs":' + lp + finish(d.finish_reason)

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
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        return self.envelope(choices, usage=usage_dict(result.usage))
