"""The public gRPC API `infermesh.v1.Inference`: the HTTP API's semantics, limits and errors over gRPC.

The request's sampling parameters are checked against the same limits table
(`infermesh.common.limits`, applied by the request path) as the HTTP API's;
the caller's gRPC deadline becomes the request's deadline, which bounds its
admission wait and travels to the worker.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from infermesh.common.catalog import TIER_HEADER, TIERS, RequestFacts
from infermesh.common.context import current_request_id, new_request_id, set_request_id
from infermesh.common.errors import InfermeshError, InvalidRequest
from infermesh.common.versions import SESSION_HEADER, VERSION_HEADER, sticky_key
from infermesh.frontend import metrics
from infermesh.frontend.auth import ApiKeys
from infermesh.frontend.backends import Backends
from infermesh.frontend.models.listing import model_list
from infermesh.frontend.models.versions import VersionChoice
from infermesh.frontend.request.constraints import ToolPlan
from infermesh.frontend.request.embedding import EmbedParams, embed
from infermesh.frontend.request.generation import ServingOptions, start_generation
from infermesh.frontend.request.targets import ModelTargets
from infermesh.frontend.request.tool_calls import ToolCallParser, finish_reason
from infermesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc


def _authorization(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


def _deadline(context: Any) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.time() + remaining


def _route_facts(request: inference_pb2.GenerateRequest, context: Any) -> RequestFacts:
    """What a catalog route's rules read of a call (its tier from the `x-infermesh-tier` metadata)."""
    tier = next((str(v) for k, v in context.invocation_metadata() or () if k == TIER_HEADER), None)
    if tier is not None and tier not in TIERS:
        raise InvalidRequest(f"the {TIER_HEADER} metadata must be one of {', '.join(TIERS)}", param=TIER_HEADER)
    users = [m.content for m in request.messages if m.role == "user"]
    if request.HasField("prompt"):
        users.append(request.prompt)
    return RequestFacts(turns=len(users), text="\n".join(users), tier=tier, tools=bool(request.tools),
                        response_format=request.sampling.HasField("structured"))


def _version_choice(context: Any, tenant: str) -> VersionChoice:
    """What picks a versioned model's version for a call: metadata `x-session-id` (else the tenant) and a
    pinned `x-infermesh-model-version`."""
    metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
    session, pin = metadata.get(SESSION_HEADER, ""), metadata.get(VERSION_HEADER, "")
    for name, value in ((SESSION_HEADER, session), (VERSION_HEADER, pin)):
        if len(value) > 256:
            raise InvalidRequest(f"the {name} metadata is longer than 256 characters", param=name)
    return VersionChoice(sticky_key(session=session, tenant=tenant), pin)


def _tool_plan(request: inference_pb2.GenerateRequest) -> ToolPlan:
    """The call's tools and output constraint, checked as the HTTP API's are."""
    if request.tools and request.HasField("prompt"):
        raise InvalidRequest("tools are for chats (messages), not prompts", param="tools")
    structured = None
    if request.sampling.HasField("structured"):
        structured = common_pb2.StructuredOutput()
        structured.CopyFrom(request.sampling.structured)
        structured.param = "sampling.structured"  # errors name this API's field, whatever the caller wrote
    return ToolPlan.of(request.tools, request.tool_choice if request.HasField("tool_choice") else None,
                       request.parallel_tool_calls if request.HasField("parallel_tool_calls") else None, structured)


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, backends: Backends, keys: ApiKeys, options: ServingOptions,
                 targets: ModelTargets | None = None) -> None:
        self.backends = backends
        self.keys = keys
        self.options = options
        self.targets = targets or ModelTargets()

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: Any) -> AsyncIterator[inference_pb2.GenerateResponse]:
        try:
            tenant = self.keys.tenant(_authorization(context))
        except InfermeshError as exc:
            metrics.GRPC_REQUESTS.labels(method="Generate", code=exc.code.name).inc()
            raise
        if request.request_id:
            set_request_id(request.request_id)
        request_id = current_request_id()
        if request_id == "-":
            request_id = new_request_id()
            set_request_id(request_id)
        code = "OK"
        try:
            has_prompt = request.HasField("prompt")
            if has_prompt == bool(request.messages):
                raise InvalidRequest("send exactly one of messages or prompt", param="messages")
            plan = _tool_plan(request)
            gen = await start_generation(
                self.backends, self.options, request_id=request_id, model=request.model,
                sampling=plan.sampling(request.sampling), tenant=tenant, priority=int(request.priority),
                messages=request.messages, prompt=request.prompt if has_prompt else None, deadline=_deadline(context),
                targets=self.targets, facts=_route_facts(request, context), tools=plan.render,
                version=_version_choice(context, tenant))
        except InfermeshError as exc:
            metrics.GRPC_REQUESTS.labels(method="Generate", code=exc.code.name).inc()
            raise
        output = gen.output
        names = plan.tool_names
        parsers = {i: ToolCallParser(names) for i in range(len(output.choices))} if names is not None else None
        active = metrics.ACTIVE_GRPC
        active.inc()
        try:
            while not output.done:
                await output.wait()
                deltas = output.take()
                if not deltas:
                    continue
                u = output.usage()  # the counts so far: the same for every delta of one take
                usage = common_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                         total_tokens=u.total_tokens, cached_tokens=u.cached_tokens)
                for d in deltas:
                    text, reason, calls = d.text, d.finish_reason, []
                    if parsers is not None:
                        parser = parsers[d.index]
                        text, parsed = parser.feed(d.text)
                        if reason:
                            rest, more = parser.finish()
                            text, parsed = text + rest, parsed + more
                            reason = finish_reason(reason, parser.calls)
                        calls = [common_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in parsed]
                    yield inference_pb2.GenerateResponse(
                        id=request_id, index=d.index, text=text, token_ids=d.token_ids, finish_reason=reason,
                        logprobs=d.logprobs, model=gen.model, usage=usage, tool_calls=calls,
                        model_version=gen.version)
            if output.error is not None:
                code = output.error.code.name
                raise output.error
        except BaseException:
            if code == "OK":
                code = "CANCELLED"  # the caller went away (or its deadline passed)
            raise
        finally:
            active.dec()
            metrics.GRPC_REQUESTS.labels(method="Generate", code=code).inc()
            await gen.close()

    async def ListModels(self, request: common_pb2.ListModelsRequest, context: Any) -> common_pb2.ListModelsResponse:
        self.keys.tenant(_authorization(context))
        return common_pb2.ListModelsResponse(models=model_list(self.targets.catalog, await self.backends.model_cards(),
                                                                 self.targets.versions))

    async def Embed(self, request: inference_pb2.EmbedRequest, context: Any) -> inference_pb2.EmbedResponse:
        """The embeddings of texts or token-id lists, as `POST /v1/embeddings` (request/embedding.py)."""
        code = "OK"
        try:
            tenant = self.keys.tenant(_authorization(context))
            if request.request_id:
                set_request_id(request.request_id)
            request_id = current_request_id()
            if request_id == "-":
                request_id = new_request_id()
                set_request_id(request_id)
            if bool(request.texts) == bool(request.token_ids):
                raise InvalidRequest("send exactly one of texts or token_ids", param="texts")
            if request.HasField("dimensions") and not request.dimensions:
                raise InvalidRequest("dimensions must be at least 1 (or unset)", param="dimensions")
            params = EmbedParams(
                model=self.targets.embed_model(request.model, _version_choice(context, tenant)), request_id=request_id,
                tenant=tenant,
                priority=int(request.priority), deadline=_deadline(context), admit_timeout=self.options.admit_timeout,
                dimensions=request.dimensions,
                truncate_prompt_tokens=request.truncate_prompt_tokens if request.HasField("truncate_prompt_tokens")
                else None, truncation_side=request.truncation_side or "right",
                param="texts" if request.texts else "token_ids")
            result = await embed(self.backends, params, texts=list(request.texts) if request.texts else None,
                                 token_ids=[list(item.ids) for item in request.token_ids] or None)
            usage = common_pb2.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
            return inference_pb2.EmbedResponse(
                id=request_id, model=self.targets.served_name(result.model), usage=usage,
                data=[inference_pb2.Embedding(index=i, embedding=v) for i, v in enumerate(result.vectors)])
        except InfermeshError as exc:
            code = exc.code.name
            raise
        except Exception:
            code = "INTERNAL"
            raise
        except BaseException:
            code = "CANCELLED"  # the caller went away (or its deadline passed)
            raise
        finally:
            metrics.GRPC_REQUESTS.labels(method="Embed", code=code).inc()
