"""The HTTP flow every OpenAI generation endpoint shares: body, caller, status, whole response or SSE.

A streamed request keeps its HTTP status open until admission decides: a quick
failure (no worker, a refusal) and the admission queue's answer, however long
it takes (a 429 when it runs out), are real HTTP statuses; an admitted request
that waits longer commits to 200 and hears keep-alives until its first token.
A client that goes away cancels the request (the worker aborts, the lease ends).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from infermesh.common.catalog import TIER_HEADER, TIERS
from infermesh.common.context import current_request_id
from infermesh.common.errors import Cancelled, InvalidRequest, PayloadTooLarge
from infermesh.common.versions import SESSION_HEADER, VERSION_HEADER, sticky_key
from infermesh.frontend import metrics
from infermesh.frontend.models.versions import VersionChoice
from infermesh.frontend.openai.formatting import ResponseFormat
from infermesh.frontend.openai.sse import DONE, KEEPALIVE, EventStream, error_event
from infermesh.frontend.request.generation import Generation
from infermesh.frontend.routes import ApiContext
from infermesh.v1 import common_pb2
from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger(__name__)

# An HTTP client's deadline for the whole request, in seconds (gRPC callers use the gRPC deadline).
TIMEOUT_HEADER = "x-request-timeout"
# The response's headers that say which model served and, after a fallback, the models tried.
MODEL_HEADER = "x-infermesh-model"
FALLBACK_HEADER = "x-infermesh-fallback"


@dataclass
class Caller:
    """Who sent an HTTP request, and until when it waits."""

    request_id: str
    tenant: str
    body: Any
    deadline: float | None  # unix seconds
    tier: str | None = None  # the cost tier asked for (header x-infermesh-tier), for the catalog's routes
    session: str = ""  # the x-session-id header: keeps a conversation on one version of a versioned model
    version_pin: str = ""  # the x-infermesh-model-version header: the version asked for

    def version_choice(self, user: str | None) -> VersionChoice:
        """What picks the version of a versioned model for this caller (session, else `user`, else tenant)."""
        return VersionChoice(sticky_key(session=self.session, user=user or "", tenant=self.tenant), self.version_pin)


def now() -> int:
    return int(time.time())


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def served_headers(gen: Generation) -> dict[str, str]:
    """Which model serves the response, its version (a versioned model's) and, after a fallback, the names
    tried (`a>b`)."""
    headers = {MODEL_HEADER: gen.model}
    if gen.version:
        headers[VERSION_HEADER] = gen.version
    if gen.fallback:
        headers[FALLBACK_HEADER] = gen.fallback
    return headers


class OpenAIServing:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def caller(self, request: Request) -> Caller:
        """The key's tenant (401 before the body is read), the body, the deadline."""
        tenant = self.ctx.keys.tenant(request.headers.get("authorization"))
        deadline = None
        timeout = request.headers.get(TIMEOUT_HEADER)
        if timeout is not None:
            try:
                seconds = float(timeout)
            except ValueError:
                seconds = -1.0
            if not 0 < seconds < 1e9:
                raise InvalidRequest(f"the {TIMEOUT_HEADER} header must be a positive number of seconds",
                                     param=TIMEOUT_HEADER)
            deadline = time.time() + seconds
        tier = request.headers.get(TIER_HEADER)
        if tier is not None and tier not in TIERS:
            raise InvalidRequest(f"the {TIER_HEADER} header must be one of {', '.join(TIERS)}", param=TIER_HEADER)
        session, pin = request.headers.get(SESSION_HEADER, ""), request.headers.get(VERSION_HEADER, "")
        for name, value in ((SESSION_HEADER, session), (VERSION_HEADER, pin)):
            if len(value) > 256:
                raise InvalidRequest(f"the {name} header is longer than 256 characters", param=name)
        return Caller(current_request_id(), tenant, await self.read_json(request), deadline, tier, session, pin)

    async def read_json(self, request: Request) -> Any:
        limit = self.ctx.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None

    async def respond(self, request: Request, gen: Generation, fmt: ResponseFormat, *, stream: bool,
                      include_usage: bool) -> Response | EventStream:
        if not stream:
            return await self._whole(request, gen, fmt)
        output = gen.output
        try:
            await output.wait(self.ctx.options.first_event_wait)
            if output.error is None and not output.decided.is_set():
                await self._until_admitted(request, gen)
            if output.error is not None:
                raise output.error
        except BaseException:
            await gen.close()
            raise
        return EventStream(lambda s: self._sse(s, gen, fmt, include_usage), on_gone=output.wake,
                           headers=served_headers(gen))

    async def _until_admitted(self, request: Request, gen: Generation) -> None:
        """Waits for the admission decision; a client that goes away meanwhile cancels the request."""
        gone = asyncio.ensure_future(_disconnected(request))
        decided = asyncio.ensure_future(gen.output.decided.wait())
        try:
            await asyncio.wait((gone, decided), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (gone, decided):
                task.cancel()
        if not gen.output.decided.is_set():
            logger.info("client went away while queued for admission; cancelling the generation")
            raise Cancelled("the client disconnected")

    async def _whole(self, request: Request, gen: Generation, fmt: ResponseFormat) -> Response:
        output = gen.output
        logprobs: dict[int, list[common_pb2.TokenLogprob]] = {}
        metrics.ACTIVE_HTTP.inc()
        # The body has been read: the next ASGI message is the client going away.
        gone = asyncio.get_running_loop().create_task(_disconnected(request))
        gone.add_done_callback(lambda _: output.wake())
        try:
            while not output.done:
                await output.wait()
                if gone.done():
                    logger.info("client went away; cancelling the generation")
                    raise Cancelled("the client disconnected")
                for d in output.take():
                    if d.logprobs:
                        logprobs.setdefault(d.index, []).extend(d.logprobs)
            if output.error is not None:
                raise output.error
            fmt.retarget(gen.model, gen.prepared.tokenizer)
            body = fmt.response(output.result(logprobs))
        finally:
            gone.cancel()
            metrics.ACTIVE_HTTP.dec()
            await gen.close()
        return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
                        media_type="application/json", headers=served_headers(gen))

    async def _sse(self, stream: EventStream, gen: Generation, fmt: ResponseFormat,
                   include_usage: bool) -> AsyncIterator[bytes]:
        keepalive = self.ctx.options.keepalive
        output = gen.output
        active = metrics.ACTIVE_HTTP
        active.inc()
        started = False  # the first chunk waits for the first output: a fallback may still change the model
        try:
            while not output.done:
                await output.wait(keepalive)
                if stream.gone:
                    logger.info("client went away; cancelling the generation")
                    return
                deltas = output.take()
                if deltas:
                    if not started:
                        started = True
                        if fmt.model != gen.model:
                            fmt.retarget(gen.model, gen.prepared.tokenizer)
                        yield fmt.start(len(output.choices)) + fmt.chunks(deltas)
                    else:
                        yield fmt.chunks(deltas)
                elif not output.done:
                    yield KEEPALIVE
            if not started and output.error is None:
                fmt.retarget(gen.model, gen.prepared.tokenizer)
                yield fmt.start(len(output.choices))
            if output.error is not None:
                logger.warning("stream failed after it started: %s", output.error.message)
                yield error_event(output.error, gen.prepared.request_id)
            elif include_usage:
                yield fmt.usage_chunk(output.usage())
            yield DONE
        except asyncio.CancelledError:
            logger.info("client went away; cancelling the generation")
            raise
        finally:
            active.dec()
            await gen.close()
