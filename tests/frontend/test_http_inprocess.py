"""The HTTP app in-process: errors that never reach a backend get OpenAI's body and the right status."""

from __future__ import annotations

import httpx
import pytest
from infermesh.frontend.app import create_app
from infermesh.frontend.auth import ApiKeys
from infermesh.frontend.backends import Backends
from infermesh.frontend.request.generation import ServingOptions

from tests.harness import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def client():
    # Backends on ports nothing listens on: these requests must be answered before any call.
    dead = f"127.0.0.1:{free_port()}"
    backends = Backends(dead, dead)
    app = create_app(backends, ApiKeys("team:sk-test"), ServingOptions(), max_body_bytes=2048)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c
    await backends.close()


def assert_openai_error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


AUTH = {"authorization": "Bearer sk-test"}


async def test_missing_and_wrong_keys_are_401(client: httpx.AsyncClient) -> None:
    assert_openai_error(await client.post("/v1/chat/completions", json=CHAT), 401)
    err = assert_openai_error(await client.post("/v1/chat/completions", json=CHAT,
                                                headers={"authorization": "Bearer nope"}), 401)
    assert "nope" not in err["message"]
    assert_openai_error(await client.get("/v1/models"), 401)


async def test_malformed_json_and_wrong_types_are_400(client: httpx.AsyncClient) -> None:
    err = assert_openai_error(await client.post("/v1/chat/completions", content=b"{not json", headers=AUTH), 400)
    assert "JSON" in err["message"]
    err = assert_openai_error(await client.post("/v1/completions", json={"model": "m", "prompt": "x",
                                                                         "max_tokens": -5}, headers=AUTH), 400)
    assert err["param"] == "max_tokens"


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_openai_error(await client.post("/v1/chat/completions", json=big, headers=AUTH), 413)


async def test_unreachable_tiers_are_503_not_500(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    reply = await client.post("/v1/chat/completions", json=CHAT, headers={**AUTH, "x-request-id": "rid-503"})
    err = assert_openai_error(reply, 503)
    # The body says what a client can act on; what failed inside (the tier, its address) is logged instead.
    assert "tokenizer" not in err["message"] and "127.0.0.1" not in err["message"]
    assert "rid-503" in err["message"] and err["code"] == "service_unavailable"
    assert any("tokenizer is unavailable" in r.getMessage() for r in caplog.records)
    reply = await client.get("/health")
    assert reply.status_code == 503 and reply.json()["status"] == "unavailable"


async def test_unknown_route_is_404_and_schema_is_served(client: httpx.AsyncClient) -> None:
    assert_openai_error(await client.get("/v1/nothing"), 404)
    reply = await client.get("/openapi.json")
    assert reply.status_code == 200
    paths = reply.json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(paths)
    metrics = (await client.get("/metrics")).text
    assert 'infermesh_http_requests_total{code="401",route="/v1/chat/completions"}' in metrics
