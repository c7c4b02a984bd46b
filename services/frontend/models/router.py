"""`GET /v1/models`: the models the workers serve."""

from __future__ import annotations

from infermesh.frontend.routes import ApiContext, Route
from starlette.requests import Request
from starlette.responses import JSONResponse


def routes(ctx: ApiContext) -> list[Route]:
    async def models(request: Request) -> JSONResponse:
        ctx.keys.tenant(request.headers.get("authorization"))
        cards = await ctx.backends.model_cards()
        data = [{"id": c.id, "object": "model", "created": c.created, "owned_by": c.owned_by or "infermesh",
                 "max_model_len": c.max_model_len, "simulated": c.simulated} for c in cards]
        return JSONResponse({"object": "list", "data": data})

    return [Route("/v1/models", "GET", models, "Models served", statuses=(200, 401, 503))]
