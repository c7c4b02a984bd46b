"""Serving logic shared by the HTTP and gRPC APIs: validate, render, generate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from infermesh.common.errors import InvalidRequest
from infermesh.frontend import metrics
from infermesh.frontend.backends import Backends
from infermesh.frontend.generation import Generation, GenerationInput
from infermesh.v1 import common_pb2, tokenizer_pb2


@dataclass
class ServingOptions:
    keepalive: float = 5.0  # seconds between SSE comments while nothing comes
    first_event_wait: float = 1.0  # how long a stream may wait for its status before committing 200
    admit_timeout: float | None = None


async def start_generation(backends: Backends, options: ServingOptions, *, request_id: str, model: str,
                           sampling: common_pb2.SamplingParams, tenant: str, priority: int,
                           messages: Sequence[common_pb2.ChatMessage] = (), prompt: str | None = None,
                           prompt_ids: list[int] | None = None, add_generation_prompt: bool = True,
                           ) -> Generation:
    """Renders the prompt, checks its length, and starts the worker side of the request."""
    if not model:
        raise InvalidRequest("model is required", param="model")
    context = common_pb2.RequestContext(request_id=request_id, tenant=tenant, priority=priority)
    requested = sampling.max_tokens if sampling.HasField("max_tokens") else None
    if prompt_ids is not None:
        tokenizer = await backends.tokenizer_model(model)
        ids = _check_ids(prompt_ids, tokenizer.vocab_size)
        budget = _check_length(len(ids), requested, tokenizer.max_model_len)
    else:
        render = tokenizer_pb2.RenderRequest(model=model, messages=messages, context=context,
                                             add_generation_prompt=add_generation_prompt)
        if prompt is not None:
            render.prompt = prompt
        if requested is not None:
            render.max_tokens = requested
        rendered = await backends.render(render)
        tokenizer = await backends.tokenizer_model(model)
        ids, budget = list(rendered.token_ids), rendered.max_tokens
    stops = list(sampling.stop)
    sampling = _with_budget(sampling, budget)
    metrics.TOKENS_IN.inc(len(ids))
    inp = GenerationInput(request_id=request_id, model=model, prompt_ids=ids, sampling=sampling,
                          stops=stops, tokenizer=tokenizer, tenant=tenant, priority=priority,
                          admit_timeout=options.admit_timeout)
    return Generation(backends, inp).start()


def _with_budget(sampling: common_pb2.SamplingParams, budget: int) -> common_pb2.SamplingParams:
    out = common_pb2.SamplingParams()
    out.CopyFrom(sampling)
    out.max_tokens = budget
    if not out.n:
        out.n = 1
    # Stop strings are matched here, in the frontend; the engine never sees them.
    del out.stop[:]
    return out


def _check_ids(ids: list[int], vocab_size: int) -> list[int]:
    if not ids:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    bad = next((t for t in ids if t < 0 or t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary (size {vocab_size})", param="prompt")
    return ids


def _check_length(prompt_tokens: int, max_tokens: int | None, window: int) -> int:
    if max_tokens is not None:
        if prompt_tokens + max_tokens > window:
            raise InvalidRequest(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                f"completion). Please reduce the length of the prompt or max_tokens.", param="max_tokens")
        return max_tokens
    if prompt_tokens >= window:
        raise InvalidRequest(f"This model's maximum context length is {window} tokens. However, the prompt has "
                             f"{prompt_tokens} tokens.", param="prompt")
    return window - prompt_tokens


def now() -> int:
    return int(time.time())
