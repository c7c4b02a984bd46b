"""The frontend's OpenAPI document (served at /openapi.json), built from the route table and the request models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infermesh.common.errors import ERRORS
from infermesh.frontend.routes import Route
from pydantic.json_schema import models_json_schema

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

# The statuses a generation request can answer with: the error table's, less those no client reads.
_GENERATION_ERRORS = sorted({cls.http_status for cls in ERRORS if cls.http_status not in (499, 405, 500)})


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": route.summary}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if route.body is None:
        op["responses"] = {str(c): {"description": route.summary} for c in route.statuses}
        return op
    op["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{route.body.__name__}"}}}}
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if route.streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {"200": {"description": route.summary, "content": ok}}
    for status in _GENERATION_ERRORS:
        responses[str(status)] = {"description": next(c.__doc__ or "" for c in ERRORS if c.http_status == status)
                                  .split("\n")[0], **error}
    op["responses"] = responses
    return op


def openapi_schema(routes: Sequence[Route], models: Sequence[str] = ()) -> dict[str, Any]:
    """The document; `models` (the served ones, when known) become the `model` field's allowed values."""
    bodies = [r.body for r in routes if r.body is not None]
    _, defs = models_json_schema([(b, "validation") for b in bodies], ref_template="#/components/schemas/{model}")
    schemas = dict(defs.get("$defs", {}))
    if models:
        for body in bodies:
            schemas[body.__name__]["properties"]["model"] = {"type": "string", "enum": list(models),
                                                             "title": "Model"}
    schemas["Error"] = _ERROR
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "infermesh frontend", "version": "1", "description": "OpenAI-compatible API."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
