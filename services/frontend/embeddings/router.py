"""`POST /v1/embeddings`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from infermesh.common.errors import Cancelled
from infermesh.frontend.embeddings.protocol import EmbeddingRequest
from infermesh.frontend.embeddings.serving import response_body
from infermesh.frontend.openai.protocol import parse
from infermesh.frontend.openai.serving import OpenAIServing
from infermesh.frontend.request.embedding import EmbedParams, embed
from infermesh.frontend.routes import ApiContext, Route
from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; a client that goes away first cancels it (the admission wait or the worker's batch)."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        # The body has been read: the next ASGI message is the client going away.
        while (await request.receive())["type"] != "http.disconnect":
            pass
    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        logger.info("client went away; cancelling the embeddings request")
        raise Cancelled("the client disconnected")
    return task.result()


def routes(ctx: ApiContext) -> list[Route]:
    serving = OpenAIServing(ctx)

    async def embeddings(request: Request) -> Response:
        caller = await serving.caller(request)
        req: EmbeddingRequest = parse(EmbeddingRequest, caller.body)  # type: ignore[arg-type]  # any model
        model = ctx.targets.embed_model(req.model, caller.version_choice(req.user))
        params = EmbedParams(model=model, request_id=caller.request_id, tenant=caller.tenant,
                             priority=req.priority_value, deadline=caller.deadline,
                             admit_timeout=ctx.options.admit_timeout, dimensions=req.dimensions or 0,
                             truncate_prompt_tokens=req.truncate_prompt_tokens,
                             truncation_side=req.truncation_side or "right")
        texts = req.texts()
        result = await _unless_gone(request, embed(ctx.backends, params, texts=texts,
                                                   token_ids=None if texts is not None else req.token_ids()))
        result.model = ctx.targets.served_name(result.model)  # a version's model by the name clients see
        return Response(response_body(result, req.encoding_format or "float"), media_type="application/json")

    return [Route("/v1/embeddings", "POST", embeddings, "Embeddings", body=EmbeddingRequest)]
