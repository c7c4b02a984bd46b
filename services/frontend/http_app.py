"""The HTTP app: routing, the error mapping's HTTP side, request metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from infermesh.common.errors import InfermeshError
from infermesh.frontend import metrics
from infermesh.frontend.auth import ApiKeys
from infermesh.frontend.backends import Backends
from infermesh.frontend.completions_api import CompletionsApi
from infermesh.frontend.drain import IMMEDIATE_FAIL_HEADER, Drain
from infermesh.frontend.errors import RouteNotFound, error_body, http_status, retry_after_header
from infermesh.frontend.openapi import openapi_schema
from infermesh.frontend.serving import ServingOptions
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/openapi.json")


def error_response(exc: BaseException) -> JSONResponse:
    status, _ = http_status(exc)
    if status >= 500 and not isinstance(exc, InfermeshError):
        logger.exception("unhandled error", exc_info=exc)
    elif status >= 500:
        logger.warning("request failed: %s", exc)
    return JSONResponse(error_body(exc), status_code=status, headers=retry_after_header(exc))


class RequestMetrics:
    """Outermost middleware: counts responses by route and status code; marks responses while draining.

    The generation routes (`fast`: path -> handler for POST) are called directly, without
    Starlette's middleware stack and router, which every request and every SSE event would
    otherwise pass through; their errors get the same responses as Starlette's handlers give.
    """

    def __init__(self, app: ASGIApp, drain: Drain,
                 fast: dict[str, Callable[[Request], Awaitable[Any]]] | None = None) -> None:
        self.app = app
        self.drain = drain
        self.fast = fast or {}
        self._counters: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        status = 0
        drain = self.drain
        drain.touch()

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if drain.draining:
                    message = {**message, "headers": [*message.get("headers", []), IMMEDIATE_FAIL_HEADER]}
            await send(message)
        handler = self.fast.get(path) if scope.get("method") == "POST" else None
        try:
            if handler is None:
                await self.app(scope, receive, counting_send)
            else:
                await _call(handler, scope, receive, counting_send)
        finally:
            key = (route, status)
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = metrics.HTTP_REQUESTS.labels(route=route, code=str(status or 499))
            counter.inc()


async def _call(handler: Callable[[Request], Awaitable[Any]], scope: Scope, receive: Receive, send: Send) -> None:
    """One request to `handler`, its errors answered as the app's exception handlers answer them."""
    try:
        response = await handler(Request(scope, receive, send))
    except Exception as exc:
        response = error_response(exc)
    await response(scope, receive, send)


def create_app(backends: Backends, keys: ApiKeys, options: ServingOptions, max_body_bytes: int,
               drain: Drain | None = None) -> ASGIApp:
    api = CompletionsApi(backends, keys, options, max_body_bytes)
    drain = drain or Drain()

    async def models(request: Request) -> Response:
        keys.tenant(request.headers.get("authorization"))
        cards = await backends.model_cards()
        data = [{"id": c.id, "object": "model", "created": c.created, "owned_by": c.owned_by or "infermesh",
                 "max_model_len": c.max_model_len, "simulated": c.simulated} for c in cards]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        if drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        ok, checks = await backends.health()
        return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503)

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    schemas: dict[tuple[str, ...], bytes] = {}

    async def openapi(request: Request) -> Response:
        try:
            served = tuple(sorted(c.id for c in await backends.model_cards()))
        except InfermeshError:
            served = ()
        if served not in schemas:
            schemas[served] = json.dumps(openapi_schema(served)).encode()
        return Response(schemas[served], media_type="application/json")

    async def not_found(request: Request, exc: Any) -> Response:
        if getattr(exc, "status_code", 404) == 405:
            return JSONResponse({"error": {"message": f"method {request.method} is not allowed on {request.url.path}",
                                           "type": "invalid_request_error", "param": None,
                                           "code": "method_not_allowed"}}, status_code=405)
        return error_response(RouteNotFound(f"no route {request.url.path}"))

    async def handled(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    app = Starlette(routes=[
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ], exception_handlers={InfermeshError: handled, Exception: handled, 404: not_found, 405: not_found})
    return RequestMetrics(app, drain, {"/v1/chat/completions": api.chat, "/v1/completions": api.completions})
