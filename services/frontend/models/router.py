"""`GET /v1/models`: the one model list (`listing.py`)."""

from __future__ import annotations

from infermesh.frontend.models.listing import model_json, model_list
from infermesh.frontend.routes import ApiContext, Route
from starlette.requests import Request
from starlette.responses import JSONResponse


def routes(ctx: ApiContext) -> list[Route]:
    async def models(request: Request) -> JSONResponse:
        ctx.keys.tenant(request.headers.get("authorization"))
        cards = model_list(ctx.targets.catalog, await ctx.backends.model_cards(), ctx.targets.versions)
        return JSONResponse({"object": "list", "data": [model_json(c) for c in cards]})

    return [Route("/v1/models", "GET", models, "Models served", statuses=(200, 401, 503))]

