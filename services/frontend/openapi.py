"""The frontend's OpenAPI schema (served at /openapi.json), built from the request models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infermesh.frontend.protocol import ChatCompletionRequest, CompletionRequest
from pydantic.json_schema import models_json_schema

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _responses(ok: str) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    out: dict[str, Any] = {"200": {"description": ok, "content": {
        "application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}}}
    for code, text in (("400", "Invalid request"), ("401", "Missing or wrong API key"), ("404", "Unknown model"),
                       ("413", "Body too large"), ("429", "Overloaded; see Retry-After"),
                       ("503", "Nothing can serve the request")):
        out[code] = {"description": text, **error}
    return out


def _post(ref: str, summary: str) -> dict[str, Any]:
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}},
        "responses": _responses(summary)}}


def _get(summary: str, codes: tuple[str, ...] = ("200",)) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {c: {"description": summary} for c in codes}}}


def openapi_schema(models: Sequence[str] = ()) -> dict[str, Any]:
    """The schema; `models` (the served ones, when known) become the `model` field's allowed values."""
    _, defs = models_json_schema([(ChatCompletionRequest, "validation"), (CompletionRequest, "validation")],
                                 ref_template="#/components/schemas/{model}")
    schemas = dict(defs.get("$defs", {}))
    if models:
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            schemas[name]["properties"]["model"] = {"type": "string", "enum": list(models),
                                                    "title": "Model"}
    schemas["Error"] = _ERROR
    return {
        "openapi": "3.1.0",
        "info": {"title": "infermesh frontend", "version": "1", "description": "OpenAI-compatible API."},
        "paths": {
            "/v1/chat/completions": _post("ChatCompletionRequest", "Chat completion"),
            "/v1/completions": _post("CompletionRequest", "Text completion"),
            "/v1/models": _get("Models served", ("200", "401", "503")),
            "/health": _get("Whether a request can be served", ("200", "503")),
        },
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
