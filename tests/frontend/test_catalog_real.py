"""The demo catalog (`deploy/catalog/demo.yaml`, the file itself) on real engines, driven with the official
`openai` client: its route sends a code question to the coder model and a plain one to the small model,
aliases answer with their model's name, the model list shows every name ready, and with the large model's
workers gone, a stream for `chat-large` is answered by `chat-small` and says so."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fixtures.catalog import DEMO_CATALOG, QWEN
from tests.fixtures.mesh import FrontendProcess, Mesh, start_frontend, start_scheduler
from tests.fixtures.worker import WorkerHandle

pytestmark = pytest.mark.engine
SMOL = "SmolLM2-135M-Instruct"


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def chat(url: str, model: str, content: str, max_tokens: int = 48) -> tuple[str, str, dict[str, str]]:
    raw = client(url).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0)
    reply = raw.parse()
    return reply.model, reply.choices[0].message.content or "", dict(raw.headers)


def test_the_route_sends_code_to_the_coder_and_the_rest_to_the_small_model(demo_mesh: Mesh) -> None:
    model, text, headers = chat(demo_mesh.url, "auto", "Write a Python function that returns the square of x.",
                                max_tokens=64)
    assert model == QWEN and headers["x-infermesh-model"] == QWEN
    assert "def " in text and "return" in text
    model, text, _ = chat(demo_mesh.url, "auto", "What is the capital of France?", max_tokens=16)
    assert model == SMOL and text.strip()
    assert chat(demo_mesh.url, "chat-large", "Say hi.", max_tokens=8)[0] == QWEN


def test_every_name_of_the_demo_is_listed_and_ready(demo_mesh: Mesh) -> None:
    listed = {m.id: m.model_dump() for m in client(demo_mesh.url).models.list()}
    assert set(listed) == {SMOL, "chat-small", QWEN, "chat-large", "auto", "all-MiniLM-L6-v2"}
    assert all(m["ready"] for m in listed.values()), listed
    assert listed["chat-large"]["parent"] == QWEN and listed[QWEN]["max_model_len"] == 2048
    assert listed["all-MiniLM-L6-v2"]["task"] == "embed" and listed["auto"]["kind"] == "route"


@pytest.fixture(scope="module")
def small_only(real_worker: WorkerHandle, demo_mesh: Mesh, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[FrontendProcess]:
    """The demo catalog with only chat-small's worker behind the scheduler: chat-large has none."""
    logs = tmp_path_factory.mktemp("demo-small-only")
    scheduler = start_scheduler(logs, [real_worker.address], catalog=str(DEMO_CATALOG))
    try:
        frontend = start_frontend(logs, demo_mesh.tokenizer.address, scheduler.address, catalog=str(DEMO_CATALOG))
        yield frontend.wait_ready()
        frontend.stop()
    finally:
        scheduler.stop()


def test_a_stream_for_the_large_model_falls_back_to_the_small_one(small_only: FrontendProcess) -> None:
    with client(small_only.url).chat.completions.with_streaming_response.create(
            model="chat-large", stream=True, max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}]) as raw:
        assert raw.headers["x-infermesh-model"] == SMOL
        assert raw.headers["x-infermesh-fallback"] == f"{QWEN}>{SMOL}"
        chunks = list(raw.parse())
    assert chunks and {c.model for c in chunks} == {SMOL}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_the_demo_catalog_is_the_one_the_readme_runs() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert 'make up ARGS="--catalog deploy/catalog/demo.yaml"' in readme
    assert DEMO_CATALOG.is_file()
