"""End to end through real Envoy on the real engine: the README's quick start
verbatim (the streaming curl and the `openai` client, pointed at this test's
Envoy), the gRPC API found by reflection through the edge port, and /health.

Uses the session's one real-engine worker (`real_mesh`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.envoy_proc import EnvoyProcess
from tests.deploy.grpc_reflect import ReflectedClient
from tests.fixtures.mesh import Mesh

pytestmark = pytest.mark.engine

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
QUICK_START_URL = "http://localhost:8080"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def block_with(language: str, needle: str) -> str:
    (block,) = [b for b in code_blocks(language) if needle in b]
    assert QUICK_START_URL in block or "localhost:8080" in block
    return block


@pytest.fixture(scope="module")
def edge(real_mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    front = real_mesh.frontend
    envoy = EnvoyProcess([(front.http_port, front.port)], tmp_path_factory.mktemp("envoy-real")).start()
    try:
        yield envoy.wait_ready(timeout=60)
    finally:
        envoy.stop()


def test_health_through_envoy(edge: EnvoyProcess) -> None:
    reply = httpx.get(edge.url + "/health", timeout=10)
    assert reply.status_code == 200
    assert reply.json()["status"] == "ok"
    assert reply.headers["server"] == "envoy" and reply.headers["x-request-id"]


def test_readme_streaming_curl(edge: EnvoyProcess) -> None:
    command = block_with("sh", "curl -N").replace(QUICK_START_URL, edge.url)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    events = [line.removeprefix("data: ") for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", result.stdout[-2000:]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert len(chunks) > 3 and text.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert {c["model"] for c in chunks} == {"SmolLM2-135M-Instruct"}


def test_readme_openai_client(edge: EnvoyProcess) -> None:
    code = block_with("python", "from openai import OpenAI").replace(QUICK_START_URL, edge.url)
    assert f'base_url="{edge.url}/v1"' in code
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the stream printed no text"


def test_grpc_api_found_by_reflection_through_the_edge(edge: EnvoyProcess) -> None:
    grpcurl = block_with("sh", "grpcurl")
    payload = json.loads(re.search(r"-d '(\{.*?\})'", grpcurl, re.DOTALL).group(1))  # type: ignore[union-attr]
    method = re.search(r"(infermesh\.v1\.Inference/\w+)", grpcurl).group(1)  # type: ignore[union-attr]
    with ReflectedClient(edge.address) as client:
        assert {"infermesh.v1.Inference", "grpc.health.v1.Health"} <= set(client.services())
        chunks = list(client.call_stream(method, payload, timeout=120))
    text = "".join(c.get("text", "") for c in chunks)
    assert text.strip()
    assert chunks[-1]["finishReason"] in ("stop", "length")
    assert int(chunks[-1]["usage"]["completionTokens"]) <= payload["sampling"]["max_tokens"]
