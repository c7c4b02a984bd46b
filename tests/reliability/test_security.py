"""Scenario 8: API keys on every model-serving route (HTTP and gRPC), no prompts or keys in any
service's log, and Envoy's body and header limits."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from infermesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from tests.deploy.envoy_proc import EnvoyProcess
from tests.fixtures.mesh import Mesh, build_sim_mesh

KEYS = {"alice": "sk-alice-" + uuid.uuid4().hex, "bob": "sk-bob-" + uuid.uuid4().hex}
SECRET = "confidential-prompt-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def keyed_mesh(model_dir: Path, tokenizer_proc: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = build_sim_mesh(tmp_path_factory.mktemp("keyed"), model_dir, tokenizer_proc, workers=1,
                          sim_ttft_ms=0, sim_itl_ms=0,
                          frontend={"api_keys": ",".join(f"{n}:{k}" for n, k in KEYS.items())})
    yield mesh
    mesh.stop()


def _routes(model: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [("POST", "/v1/chat/completions", {"model": model, "max_tokens": 2,
                                              "messages": [{"role": "user", "content": "hi"}]}),
            ("POST", "/v1/completions", {"model": model, "max_tokens": 2, "prompt": "hi"}),
            ("GET", "/v1/models", None)]


def test_api_keys_are_enforced_on_every_model_route_over_http(keyed_mesh: Mesh, report) -> None:
    refused = allowed = 0
    wrong = [None, "Bearer sk-wrong", f"Basic {KEYS['alice']}", f"Bearer {KEYS['alice']}x", "Bearer", KEYS["bob"]]
    for method, path, body in _routes(keyed_mesh.model):
        for auth in wrong:
            headers = {"authorization": auth} if auth is not None else {}
            reply = httpx.request(method, keyed_mesh.url + path, json=body, headers=headers, timeout=30)
            assert reply.status_code == 401, (path, auth, reply.status_code)
            assert reply.json()["error"]["type"] == "authentication_error"
            refused += 1
            # Streams are refused before they start.
            if body is not None:
                streamed = httpx.post(keyed_mesh.url + path, json={**body, "stream": True}, headers=headers,
                                      timeout=30)
                assert streamed.status_code == 401
                refused += 1
        for key in KEYS.values():
            reply = httpx.request(method, keyed_mesh.url + path, json=body,
                                  headers={"authorization": f"Bearer {key}"}, timeout=30)
            assert reply.status_code == 200, reply.text
            allowed += 1
    # The routes that serve no model need no key.
    for path in ("/health", "/metrics", "/openapi.json"):
        assert httpx.get(keyed_mesh.url + path, timeout=10).status_code == 200
    report("api-keys-http", refused=refused, allowed=allowed)


async def test_api_keys_are_enforced_over_grpc(keyed_mesh: Mesh, report) -> None:
    codes = []
    async with grpc.aio.insecure_channel(keyed_mesh.frontend.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(model=keyed_mesh.model, prompt="hi",
                                                sampling=common_pb2.SamplingParams(max_tokens=2))
        for metadata in [(), (("authorization", "Bearer sk-wrong"),), (("authorization", KEYS["alice"]),)]:
            for call in (lambda m=metadata: stub.ListModels(common_pb2.ListModelsRequest(), metadata=m),
                         lambda m=metadata: stub.Generate(request, metadata=m).read()):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call()
                codes.append(info.value.code())
        good = (("authorization", f"Bearer {KEYS['bob']}"),)
        models = await stub.ListModels(common_pb2.ListModelsRequest(), metadata=good)
        first = await stub.Generate(request, metadata=good).read()
    report("api-keys-grpc", refused=len(codes), codes=sorted({c.name for c in codes}))
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert [m.id for m in models.models] == [keyed_mesh.model]
    assert first.text or first.token_ids


async def test_prompts_and_keys_never_reach_the_logs(keyed_mesh: Mesh, report) -> None:
    auth = {"authorization": f"Bearer {KEYS['alice']}"}
    model = keyed_mesh.model
    async with httpx.AsyncClient(base_url=keyed_mesh.url, timeout=30, headers=auth) as client:
        bodies = [
            ("/v1/chat/completions", {"model": model, "max_tokens": 3, "messages": [
                {"role": "system", "content": SECRET}, {"role": "user", "content": SECRET}]}),
            ("/v1/chat/completions", {"model": model, "max_tokens": 3, "stream": True,
                                      "messages": [{"role": "user", "content": SECRET}]}),
            ("/v1/completions", {"model": model, "max_tokens": 3, "prompt": SECRET, "stop": [SECRET]}),
            # Refused requests, whose error messages must not echo the prompt either.
            ("/v1/completions", {"model": model, "max_tokens": 10**9, "prompt": SECRET}),
            ("/v1/completions", {"model": "no-such-model", "prompt": SECRET}),
            ("/v1/chat/completions", {"model": model, "messages": [{"role": SECRET, "content": SECRET}]}),
            ("/v1/completions", {"model": model, "prompt": SECRET, "temperature": SECRET}),
        ]
        codes = [(await client.post(path, json=body)).status_code for path, body in bodies]
        # A wrong key is not logged either.
        wrong = await client.post("/v1/completions", json=bodies[2][1],
                                  headers={"authorization": "Bearer sk-wrong-" + SECRET})
    async with grpc.aio.insecure_channel(keyed_mesh.frontend.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reply = stub.Generate(inference_pb2.GenerateRequest(
            model=model, prompt=SECRET, sampling=common_pb2.SamplingParams(max_tokens=3)),
            metadata=(("authorization", f"Bearer {KEYS['bob']}"),))
        async for _ in reply:
            pass
    logs = {p.name: p.log() for p in [keyed_mesh.tokenizer, keyed_mesh.scheduler, keyed_mesh.frontend,
                                      *keyed_mesh.workers]}
    leaks = {name: [s for s in (SECRET, *KEYS.values(), "sk-wrong") if s in text] for name, text in logs.items()}
    report("log-secrecy", requests=len(codes) + 2, codes=sorted(set(codes)), wrong_key=wrong.status_code,
           log_bytes={n: len(t) for n, t in logs.items()}, leaks={n: len(v) for n, v in leaks.items()})
    assert 200 in codes and 400 in codes and wrong.status_code == 401
    assert all(len(text) > 0 for text in logs.values())
    assert not any(leaks.values()), leaks


def test_envoy_limits_body_and_header_sizes(keyed_mesh: Mesh, tmp_path: Path, report) -> None:
    front = keyed_mesh.frontend
    envoy = EnvoyProcess([(front.http_port, front.port)], tmp_path, max_request_bytes=64 * 1024).start()
    try:
        envoy.wait_ready(path=None)
        auth = {"authorization": f"Bearer {KEYS['alice']}"}
        body = {"model": keyed_mesh.model, "max_tokens": 2, "prompt": "hi"}
        ok = httpx.post(envoy.url + "/v1/completions", json=body, headers=auth, timeout=30)
        big_body = httpx.post(envoy.url + "/v1/completions", json={**body, "prompt": "x" * 100_000},
                              headers=auth, timeout=30)
        big_header = httpx.post(envoy.url + "/v1/completions", json=body,
                                headers={**auth, "x-padding": "y" * 100 * 1024}, timeout=30)
        many_headers = httpx.post(envoy.url + "/v1/completions", json=body,
                                  headers={**auth, **{f"x-h{i}": "z" for i in range(200)}}, timeout=30)
    finally:
        envoy.stop()
    report("envoy-limits", ok=ok.status_code, body_100kb=big_body.status_code, header_100kb=big_header.status_code,
           headers_200=many_headers.status_code)
    assert ok.status_code == 200
    assert big_body.status_code == 413
    assert big_header.status_code == 431
    assert many_headers.status_code == 431


def test_generated_http_requests_through_envoy_with_keys_never_get_a_5xx(keyed_mesh: Mesh, tmp_path: Path,
                                                                         report) -> None:
    """tests/frontend/test_schemathesis.py runs on a bare frontend; this one goes through the
    edge with API keys on (every generated request authenticated, so it reaches the routes)."""
    import subprocess
    import sys

    front = keyed_mesh.frontend
    envoy = EnvoyProcess([(front.http_port, front.port)], tmp_path).start()
    try:
        envoy.wait_ready()
        started = time.monotonic()
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", front.url + "/openapi.json",
             "--url", envoy.url, "--header", f"Authorization: Bearer {KEYS['alice']}",
             "--checks", "not_a_server_error", "--max-examples", "40", "--generation-deterministic",
             "--request-timeout", "60"], capture_output=True, text=True, timeout=300)
        took = time.monotonic() - started
        stats = envoy.stats()
    finally:
        envoy.stop()
    prefix = "cluster.frontend_http.upstream_rq_"
    codes = {k[len(prefix):]: v for k, v in stats.items() if k in {prefix + c for c in ("2xx", "4xx", "5xx")}}
    report("schemathesis-edge", seconds=took, upstream_codes=codes, exit=result.returncode)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert codes.get("2xx", 0) > 0 and codes.get("5xx", 0) == 0, codes
