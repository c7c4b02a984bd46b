"""The route table's types: each HTTP route is declared once, as a `Route`, by its endpoint family.

Every endpoint family (`chat/`, `completions/`, `models/`, `system/`, one
folder each) has a `router.py` whose `routes(ctx)` returns its `Route`s. The
app (`app.py`) dispatches on them, labels its request metrics by them, and
builds the OpenAPI document from them: a new endpoint is a new folder and one
line in `app.FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from infermesh.frontend.auth import ApiKeys
from infermesh.frontend.drain import Drain
from infermesh.frontend.request.generation import ServingOptions
from infermesh.frontend.request.interfaces import RequestBackends
from infermesh.frontend.request.targets import ModelTargets
from starlette.requests import Request

Handler = Callable[[Request], Awaitable[Any]]  # returns an ASGI response (Starlette's, or an EventStream)


@dataclass(frozen=True)
class Route:
    path: str
    method: str  # GET routes answer HEAD too
    handler: Handler
    summary: str
    body: type | None = None  # the request model (a pydantic model), for the OpenAPI document
    statuses: tuple[int, ...] = (200,)  # what it answers besides errors of the table, for the document
    streams: bool = False  # may answer text/event-stream


@dataclass
class ApiContext:
    """What the route handlers share."""

    backends: Any  # infermesh.frontend.backends.Backends (RequestBackends plus model cards and health)
    keys: ApiKeys
    options: ServingOptions
    max_body_bytes: int
    drain: Drain
    routes: list[Route] = field(default_factory=list)  # every route of the app, once collected
    targets: ModelTargets = field(default_factory=ModelTargets)  # the catalog's names (aliases, routes, chains)

    @property
    def request_backends(self) -> RequestBackends:
        return self.backends  # type: ignore[no-any-return]
