"""The HTTP app: one dispatcher over the route table, the error mapping's HTTP side, request metrics.

Routes come from the endpoint families (`FAMILIES`), each declared once (see
`routes.py`). The dispatcher is plain ASGI: it binds the request id, looks the
route up, answers an unknown path with 404 and a known path with the wrong
method with 405, counts every response by route and status, and marks
responses while draining so the edge stops sending work here. Any error a
handler raises becomes OpenAI's error body with the status of the error table
(`infermesh.common.errors`); a server-side failure's real message is logged
with the request id, never sent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from infermesh.common.context import REQUEST_ID_HEADER, current_request_id, set_request_id
from infermesh.common.errors import (
    InfermeshError,
    MethodNotAllowed,
    RouteNotFound,
    error_body,
    http_status,
    retry_after_header,
)
from infermesh.frontend import metrics
from infermesh.frontend.auth import ApiKeys
from infermesh.frontend.chat import router as chat
from infermesh.frontend.completions import router as completions
from infermesh.frontend.drain import IMMEDIATE_FAIL_HEADER, Drain
from infermesh.frontend.embeddings import router as embeddings
from infermesh.frontend.models import router as models
from infermesh.frontend.request.generation import ServingOptions
from infermesh.frontend.request.targets import ModelTargets
from infermesh.frontend.routes import ApiContext, Route
from infermesh.frontend.system import router as system
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

FAMILIES = (chat, completions, embeddings, models, system)


def error_response(exc: BaseException) -> JSONResponse:
    status = http_status(exc)
    if status >= 500 and not isinstance(exc, InfermeshError):
        logger.exception("unhandled error", exc_info=exc)
    elif status >= 500:
        logger.warning("request failed (%s): %s", type(exc).__name__, exc)
    return JSONResponse(error_body(exc, current_request_id()), status_code=status, headers=retry_after_header(exc))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class HttpApp:
    def __init__(self, routes: Sequence[Route], drain: Drain) -> None:
        self.routes = list(routes)
        self.drain = drain
        self._by_path: dict[str, dict[str, Route]] = {}
        for route in self.routes:
            methods = self._by_path.setdefault(route.path, {})
            if route.method in methods:
                raise ValueError(f"route {route.method} {route.path} is declared twice")
            methods[route.method] = route
            if route.method == "GET":
                methods["HEAD"] = route
        metrics.precreate([r.path for r in self.routes])
        self._counters: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan events: the servers own start-up and shutdown
        path = scope.get("path", "")
        methods = self._by_path.get(path)
        label = path if methods is not None else "other"
        set_request_id(_header(scope, REQUEST_ID_HEADER.encode()))
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

        try:
            try:
                if methods is None:
                    raise RouteNotFound(f"no route {path}")
                route = methods.get(scope.get("method", ""))
                if route is None:
                    raise MethodNotAllowed(f"method {scope.get('method')} is not allowed on {path}")
                response = await route.handler(Request(scope, receive, send))
            except Exception as exc:
                response = error_response(exc)
            await response(scope, receive, counting_send)
        finally:
            key = (label, status)
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = metrics.HTTP_REQUESTS.labels(route=label, code=str(status or 499))
            counter.inc()


def create_app(backends: Any, keys: ApiKeys, options: ServingOptions, max_body_bytes: int,
               drain: Drain | None = None, targets: ModelTargets | None = None) -> HttpApp:
    ctx = ApiContext(backends, keys, options, max_body_bytes, drain or Drain(), targets=targets or ModelTargets())
    ctx.routes = [route for family in FAMILIES for route in family.routes(ctx)]
    return HttpApp(ctx.routes, ctx.drain)
