"""One request in flight: its prepared input, its output buffer and the attempts that fill it.

`start_generation` is the request path's one entry for every API: prepare
(limits, render, context window), then admission and worker calls in the
background. The API's reader waits on `output`, takes what is new, and calls
`close()` however it ends (a client that goes away included), which cancels
the worker calls and releases their leases.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from infermesh.frontend import metrics
from infermesh.frontend.request.attempts import Attempts
from infermesh.frontend.request.interfaces import RequestBackends
from infermesh.frontend.request.output import OutputBuffer
from infermesh.frontend.request.prepare import PreparedRequest, prepare
from infermesh.v1 import common_pb2


@dataclass
class ServingOptions:
    keepalive: float = 5.0  # seconds between SSE comments while nothing comes
    first_event_wait: float = 1.0  # how long a stream may wait for its status before committing 200
    admit_timeout: float | None = None


class Generation:
    def __init__(self, backends: RequestBackends, prepared: PreparedRequest) -> None:
        self.prepared = prepared
        self.output = OutputBuffer(prepared.n, prepared.tokenizer, prepared.stops, len(prepared.prompt_ids))
        self.attempts = Attempts(backends, prepared, self.output)
        self._closed = False

    def start(self) -> Generation:
        self.attempts.start()
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.output.close()
        await self.attempts.close()
        if self.output.first_token_at is not None:
            metrics.E2E.observe(time.perf_counter() - self.output.started_at)
        metrics.TOKENS_OUT.inc(self.output.completion_tokens)


async def start_generation(backends: RequestBackends, options: ServingOptions, *, request_id: str, model: str,
                           sampling: common_pb2.SamplingParams, tenant: str, priority: int,
                           messages: Sequence[common_pb2.ChatMessage] = (), prompt: str | None = None,
                           prompt_ids: list[int] | None = None, add_generation_prompt: bool = True,
                           params: Mapping[str, str] | None = None, deadline: float | None = None) -> Generation:
    prepared = await prepare(backends, request_id=request_id, model=model, sampling=sampling, tenant=tenant,
                             priority=priority, messages=messages, prompt=prompt, prompt_ids=prompt_ids,
                             add_generation_prompt=add_generation_prompt, params=params, deadline=deadline,
                             admit_timeout=options.admit_timeout)
    return Generation(backends, prepared).start()
