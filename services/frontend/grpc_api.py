"""The public gRPC API `infermesh.v1.Inference`: the HTTP API's semantics and errors over gRPC."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

from infermesh.common.context import current_request_id, new_request_id, set_request_id
from infermesh.common.errors import InvalidRequest
from infermesh.frontend import metrics
from infermesh.frontend.auth import ApiKeys
from infermesh.frontend.backends import Backends
from infermesh.frontend.protocol import MAX_N
from infermesh.frontend.serving import ServingOptions, start_generation
from infermesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

# (field, low, high, low inclusive) for the optional float fields.
_RANGES = (("temperature", 0.0, 2.0, True), ("top_p", 0.0, 1.0, False), ("min_p", 0.0, 1.0, True),
           ("presence_penalty", -2.0, 2.0, True), ("frequency_penalty", -2.0, 2.0, True),
           ("repetition_penalty", 0.0, 10.0, False))


def validate_sampling(s: common_pb2.SamplingParams) -> None:
    """The same limits as the HTTP API's request models."""
    for name, low, high, inclusive in _RANGES:
        if s.HasField(name):
            value = getattr(s, name)
            if math.isnan(value) or value > high or value < low or (value == low and not inclusive):
                raise InvalidRequest(f"sampling.{name} must be in {'[' if inclusive else '('}{low}, {high}], "
                                     f"got {value}", param=name)
    if s.HasField("max_tokens") and s.max_tokens < 1:
        raise InvalidRequest("sampling.max_tokens must be at least 1", param="max_tokens")
    if s.HasField("n") and not 1 <= s.n <= MAX_N:
        raise InvalidRequest(f"sampling.n must be between 1 and {MAX_N}", param="n")
    if s.HasField("logprobs") and s.logprobs > 20:
        raise InvalidRequest("sampling.logprobs must be at most 20", param="logprobs")
    if s.HasField("top_k") and s.top_k < -1:
        raise InvalidRequest("sampling.top_k must be -1 (off) or positive", param="top_k")


def _authorization(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, backends: Backends, keys: ApiKeys, options: ServingOptions) -> None:
        self.backends = backends
        self.keys = keys
        self.options = options

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: Any) -> AsyncIterator[inference_pb2.GenerateResponse]:
        tenant = self.keys.tenant(_authorization(context))
        if request.request_id:
            set_request_id(request.request_id)
        request_id = current_request_id()
        if request_id == "-":
            request_id = new_request_id()
            set_request_id(request_id)
        has_prompt = request.HasField("prompt")
        if has_prompt == bool(request.messages):
            raise InvalidRequest("send exactly one of messages or prompt", param="messages")
        validate_sampling(request.sampling)
        gen = await start_generation(
            self.backends, self.options, request_id=request_id, model=request.model, sampling=request.sampling,
            tenant=tenant, priority=int(request.priority), messages=request.messages,
            prompt=request.prompt if has_prompt else None)
        active = metrics.ACTIVE_GRPC
        active.inc()
        code = "OK"
        try:
            while not gen.done:
                await gen.wait()
                for d in gen.take():
                    completion = gen.completion_tokens
                    usage = common_pb2.Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=completion,
                                             total_tokens=gen.prompt_tokens + completion,
                                             cached_tokens=gen.cached_tokens)
                    yield inference_pb2.GenerateResponse(
                        id=request_id, index=d.index, text=d.text, token_ids=d.token_ids,
                        finish_reason=d.finish_reason, usage=usage, logprobs=d.logprobs, model=request.model)
            if gen.error is not None:
                code = gen.error.code.name
                raise gen.error
        finally:
            active.dec()
            metrics.GRPC_REQUESTS.labels(method="Generate", code=code).inc()
            await gen.close()

    async def ListModels(self, request: common_pb2.ListModelsRequest, context: Any) -> common_pb2.ListModelsResponse:
        self.keys.tenant(_authorization(context))
        return common_pb2.ListModelsResponse(models=await self.backends.model_cards())
