"""HTTP handlers of /v1/chat/completions and /v1/completions: JSON responses and SSE streams."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from infermesh.common.context import REQUEST_ID_HEADER, new_request_id, set_request_id
from infermesh.common.errors import Cancelled, InvalidRequest
from infermesh.frontend import metrics
from infermesh.frontend.auth import ApiKeys
from infermesh.frontend.backends import Backends
from infermesh.frontend.errors import PayloadTooLarge, sse_error_event
from infermesh.frontend.event_stream import EventStream
from infermesh.frontend.generation import Generation
from infermesh.frontend.protocol import ChatCompletionRequest, CompletionRequest, parse
from infermesh.frontend.responses import DONE, KEEPALIVE, ChatFormat, CompletionFormat
from infermesh.frontend.serving import ServingOptions, now, start_generation
from infermesh.v1 import common_pb2
from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger(__name__)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_admitted(request: Request, gen: Generation) -> None:
    """Waits for the admission decision; a client that goes away meanwhile cancels the request."""
    gone = asyncio.ensure_future(_disconnected(request))
    decided = asyncio.ensure_future(gen.decided.wait())
    try:
        await asyncio.wait((gone, decided), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (gone, decided):
            task.cancel()
    if not gen.decided.is_set():
        logger.info("client went away while queued for admission; cancelling the generation")
        raise Cancelled("the client disconnected")


class CompletionsApi:
    def __init__(self, backends: Backends, keys: ApiKeys, options: ServingOptions, max_body_bytes: int) -> None:
        self.backends = backends
        self.keys = keys
        self.options = options
        self.max_body_bytes = max_body_bytes

    async def chat(self, request: Request) -> Response | EventStream:
        return await self._serve(request, chat=True)

    async def completions(self, request: Request) -> Response | EventStream:
        return await self._serve(request, chat=False)

    async def read_json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise PayloadTooLarge(f"the request body is larger than {self.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(f"the request body is larger than {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None

    async def _serve(self, request: Request, *, chat: bool) -> Response | EventStream:
        request_id = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
        set_request_id(request_id)
        tenant = self.keys.tenant(request.headers.get("authorization"))
        body = await self.read_json(request)
        req: ChatCompletionRequest | CompletionRequest
        if chat:
            req = parse(ChatCompletionRequest, body)
            gen = await start_generation(
                self.backends, self.options, request_id=request_id, model=req.model, sampling=req.to_sampling(),
                tenant=tenant, priority=req.priority_value, messages=req.chat_messages(),
                add_generation_prompt=req.add_generation_prompt)
        else:
            req = parse(CompletionRequest, body)
            prompt = req.prompt_input()
            gen = await start_generation(
                self.backends, self.options, request_id=request_id, model=req.model, sampling=req.to_sampling(),
                tenant=tenant, priority=req.priority_value, prompt=prompt if isinstance(prompt, str) else None,
                prompt_ids=prompt if isinstance(prompt, list) else None)
        fmt_cls = ChatFormat if chat else CompletionFormat
        fmt = fmt_cls(("chatcmpl-" if chat else "cmpl-") + request_id, now(), req.model, gen.inp.tokenizer,
                      req.num_logprobs() is not None)
        if not req.stream:
            return await self._whole(request, gen, fmt)
        try:
            # A quick failure (no worker, a worker's refusal) still gets its HTTP status, and so does
            # the admission queue's answer however long it takes (a 429 when it runs out); an admitted
            # request that waits longer commits to 200 and hears keep-alives until its first token.
            await gen.wait(self.options.first_event_wait)
            if gen.error is None and not gen.decided.is_set():
                await _until_admitted(request, gen)
            if gen.error is not None:
                raise gen.error
        except BaseException:
            await gen.close()
            raise
        include_usage = req.include_usage
        return EventStream(lambda stream: self._sse(stream, gen, fmt, include_usage), on_gone=gen.wake)

    async def _whole(self, request: Request, gen: Generation, fmt: ChatFormat | CompletionFormat) -> Response:
        logprobs: dict[int, list[common_pb2.TokenLogprob]] = {}
        metrics.ACTIVE_HTTP.inc()
        # The body has been read: the next ASGI message is the client going away.
        gone = asyncio.get_running_loop().create_task(_disconnected(request))
        gone.add_done_callback(lambda _: gen.wake())
        try:
            while not gen.done:
                await gen.wait()
                if gone.done():
                    logger.info("client went away; cancelling the generation")
                    raise Cancelled("the client disconnected")
                for d in gen.take():
                    if d.logprobs:
                        logprobs.setdefault(d.index, []).extend(d.logprobs)
            if gen.error is not None:
                raise gen.error
            body = fmt.response(gen, logprobs)
        finally:
            gone.cancel()
            metrics.ACTIVE_HTTP.dec()
            await gen.close()
        return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
                        media_type="application/json")

    async def _sse(self, stream: EventStream, gen: Generation, fmt: ChatFormat | CompletionFormat,
                   include_usage: bool) -> AsyncIterator[bytes]:
        keepalive = self.options.keepalive
        active = metrics.ACTIVE_HTTP
        active.inc()
        try:
            yield fmt.start(len(gen.choices))
            while not gen.done:
                await gen.wait(keepalive)
                if stream.gone:
                    logger.info("client went away; cancelling the generation")
                    return
                deltas = gen.take()
                if deltas:
                    yield fmt.chunks(deltas)
                elif not gen.done:
                    yield KEEPALIVE
            if gen.error is not None:
                logger.warning("stream failed after it started: %s", gen.error.message)
                yield sse_error_event(gen.error)
            elif include_usage:
                yield fmt.usage_chunk(gen)
            yield DONE
        except asyncio.CancelledError:
            logger.info("client went away; cancelling the generation")
            raise
        finally:
            active.dec()
            await gen.close()
