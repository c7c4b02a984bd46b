"""`/health` (whether a request can be served), `/metrics` (Prometheus) and `/openapi.json`."""

from __future__ import annotations

import json

from infermesh.common.errors import InfermeshError
from infermesh.frontend.openapi import openapi_schema
from infermesh.frontend.routes import ApiContext, Route
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response


def routes(ctx: ApiContext) -> list[Route]:
    async def health(request: Request) -> JSONResponse:
        if ctx.drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        ok, checks = await ctx.backends.health()
        return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503)

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    schemas: dict[tuple[str, ...], bytes] = {}

    async def openapi(request: Request) -> Response:
        try:
            served = tuple(sorted(c.id for c in await ctx.backends.model_cards()))
        except InfermeshError:
            served = ()
        if served not in schemas:
            schemas[served] = json.dumps(openapi_schema(ctx.routes, served)).encode()
        return Response(schemas[served], media_type="application/json")

    return [Route("/health", "GET", health, "Whether a request can be served", statuses=(200, 503)),
            Route("/metrics", "GET", prometheus, "Prometheus metrics"),
            Route("/openapi.json", "GET", openapi, "This document")]
