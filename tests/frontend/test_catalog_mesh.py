"""A catalog over real processes (tokenizer, scheduler, simulated workers, frontend), driven with the official
`openai` client: aliases and the route answer with the model that served, the model list, a streamed request
falling back when its model has no worker left (with the headers and metrics that say so), and reloads of the
catalog under load with no request failed (an invalid file refused, the running catalog kept)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from infermesh.common.catalog import parse_catalog

from tests.fixtures.mesh import FrontendProcess, start_frontend, start_scheduler
from tests.fixtures.worker import start_sim_worker
from tests.harness import ServiceProcess, free_port

CATALOG = """
format: 1
models:
  - name: small
    weights: {{dir: {model}}}
    aliases: [chat-small]
    tier: cheap
    prices: {{prompt_per_mtok: 0.02, completion_per_mtok: 0.05}}
  - name: large
    weights: {{dir: {model}}}
    aliases: [chat-large]
    tier: standard
    prices: {{prompt_per_mtok: 0.10, completion_per_mtok: 0.30}}
routes:
  - name: auto
    default: chat-small
    rules:
      - model: chat-large
        when: {{tier: [standard, premium]}}
      - model: chat-large
        when: {{keywords: [python, sql, regex, javascript, rust, bug]}}
fallbacks:
  - chain: [chat-large, chat-small]
cooldown: {{failures: 3, window_s: 60, skip_s: 300}}
{extra}
"""


@dataclass
class CatalogMesh:
    catalog: Path
    model_dir: Path
    frontend: FrontendProcess
    large: ServiceProcess
    procs: list[ServiceProcess]
    spare: int  # a worker port the scheduler lists, where no worker runs yet (a model added later)

    def write(self, extra: str = "", text: str | None = None) -> None:
        """Replaces the file at once (as a ConfigMap update does), so a reader never sees half of it."""
        staged = self.catalog.with_suffix(".new")
        staged.write_text(text if text is not None else CATALOG.format(model=self.model_dir, extra=extra))
        os.replace(staged, self.catalog)

    def metric(self, name: str, **labels: str) -> float:
        body = httpx.get(self.frontend.url + "/metrics", timeout=5).text
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in body.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no sample {name}{{{wanted}}}")

    def names(self) -> set[str]:
        return {m["id"] for m in httpx.get(self.frontend.url + "/v1/models", timeout=5).json()["data"]}


@pytest.fixture(scope="module")
def mesh(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CatalogMesh]:
    logs = tmp_path_factory.mktemp("catalog-mesh")
    catalog = logs / "catalog.yaml"
    catalog.write_text(CATALOG.format(model=model_dir, extra=""))
    procs: list[ServiceProcess] = []
    try:
        port = free_port()
        tokenizer = ServiceProcess("tokenizer-catalog", ["tokenizer", "--port", str(port), "--metrics-port", "0",
                                                         "--catalog", str(catalog)], port=port, log_dir=logs)
        procs.append(tokenizer.start().wait_healthy(60))
        sim = {"sim_ttft_ms": 5, "sim_itl_ms": 5}
        small = [start_sim_worker(logs, model=f"small={model_dir}", **sim) for _ in range(2)]
        large = start_sim_worker(logs, model=f"large={model_dir}", **sim)
        procs += [*small, large]
        spare = free_port()
        scheduler = start_scheduler(logs, [p.address for p in procs[1:]] + [f"127.0.0.1:{spare}"],
                                    catalog=str(catalog))
        procs.append(scheduler)
        frontend = start_frontend(logs, tokenizer.address, scheduler.address, catalog=str(catalog))
        procs.append(frontend.wait_ready())
        yield CatalogMesh(catalog, model_dir, frontend, large, procs, spare)
    finally:
        for proc in reversed(procs):
            proc.stop()


def client(mesh: CatalogMesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.frontend.url + "/v1", api_key="unused", max_retries=0)


def ask(mesh: CatalogMesh, model: str, content: str = "Hello there", **extra: object) -> tuple[str, httpx.Headers]:
    raw = client(mesh).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=4, **extra)  # type: ignore[call-overload]
    return raw.parse().model, raw.headers


def test_aliases_and_the_route_answer_with_the_model_that_served(mesh: CatalogMesh) -> None:
    assert ask(mesh, "chat-small")[0] == "small"
    served, headers = ask(mesh, "chat-large")
    assert served == "large" and headers["x-infermesh-model"] == "large" and "x-infermesh-fallback" not in headers
    assert ask(mesh, "auto", "What is the capital of France?")[0] == "small"
    assert ask(mesh, "auto", "Write python to sort a list")[0] == "large"
    assert ask(mesh, "auto", extra_headers={"x-infermesh-tier": "standard"})[0] == "large"
    assert mesh.metric("infermesh_frontend_route_decisions_total", route="auto", target="large") >= 2
    with pytest.raises(openai.NotFoundError) as info:
        ask(mesh, "gpt-4")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        ask(mesh, "auto", extra_headers={"x-infermesh-tier": "gold"})
    assert bad.value.body["param"] == "x-infermesh-tier"  # type: ignore[index]


def test_the_model_list_shows_models_aliases_and_routes(mesh: CatalogMesh) -> None:
    listed = {m.id: m.model_dump() for m in client(mesh).models.list()}
    assert set(listed) == {"small", "chat-small", "large", "chat-large", "auto"}
    assert listed["chat-large"]["parent"] == "large" and listed["chat-large"]["root"] == "large"
    assert listed["large"]["tier"] == "standard" and listed["large"]["ready"] is True
    assert listed["auto"]["kind"] == "route" and listed["small"]["max_model_len"] > 0


async def _stream(url: str, model: str, failures: list[str]) -> str:
    async with httpx.AsyncClient(timeout=30) as http, http.stream("POST", url + "/v1/chat/completions",
                           json={"model": model, "stream": True, "max_tokens": 16,
                                 "messages": [{"role": "user", "content": "Count to ten"}]}) as reply:
        body = (await reply.aread()).decode()
    if reply.status_code != 200 or "data: [DONE]" not in body or '"error"' in body:
        failures.append(f"{reply.status_code}: {body[-300:]}")
    return body


def test_reloads_under_load_fail_no_request(mesh: CatalogMesh) -> None:
    original = mesh.catalog.read_text()
    with_alias = original.replace("[chat-small]", "[chat-small, chat-tiny]")
    invalid = with_alias.replace("default: chat-small", "default: nope")

    async def load() -> list[str]:
        failures: list[str] = []
        tasks: set[asyncio.Task[str]] = set()
        phase, deadline, settle = "alias", time.monotonic() + 60, 0.0
        mesh.write(text=with_alias)  # picked up by the frontend's watch of the file, under the load below
        while time.monotonic() < deadline:
            while len(tasks) < 12:
                tasks.add(asyncio.ensure_future(_stream(mesh.frontend.url, "chat-small", failures)))
            _, tasks = await asyncio.wait(tasks, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
            if phase == "alias" and "chat-tiny" in await asyncio.to_thread(mesh.names):
                mesh.write(text=invalid)
                mesh.frontend.signal(signal.SIGHUP)
                phase, settle = "invalid", time.monotonic() + 3  # the watch sees it too, within its 2 s
            elif phase == "invalid" and time.monotonic() > settle:
                break
        await asyncio.gather(*tasks)
        assert phase == "invalid", "the new alias never appeared"
        return failures

    assert asyncio.run(load()) == []
    # The valid change took effect; the invalid one was refused and the running catalog stayed.
    assert "chat-tiny" in mesh.names()
    assert ask(mesh, "chat-tiny")[0] == "small"
    assert ask(mesh, "auto")[0] == "small"
    log = mesh.frontend.log()
    assert "refused, keeping the running one" in log and "routes[0].default" in log
    mesh.write(text=original)  # back to the original for the tests after this one
    deadline = time.monotonic() + 15
    while "chat-tiny" in mesh.names() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "chat-tiny" not in mesh.names()


def test_a_model_added_to_the_catalog_is_served_once_its_worker_starts(mesh: CatalogMesh) -> None:
    original = mesh.catalog.read_text()
    mesh.write(text=original.replace("routes:", f"  - name: extra\n    weights: {{dir: {mesh.model_dir}}}\nroutes:"))
    body = {"model": "extra", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    deadline, status = time.monotonic() + 20, 0
    while time.monotonic() < deadline:
        # 404 until the frontend took the new catalog; then, once the tokenizer has the model's tokenizer
        # and the scheduler its queue, 503: a model of the catalog with no worker yet.
        status = httpx.post(mesh.frontend.url + "/v1/chat/completions", json=body, timeout=10).status_code
        if status == 503:
            break
        assert status == 404, status
        time.sleep(0.2)
    assert status == 503
    assert next(m for m in client(mesh).models.list().data if m.id == "extra").model_dump()["ready"] is False
    worker = ServiceProcess("sim-worker-extra", ["worker", "--engine", "sim", "--port", str(mesh.spare),
                                                 "--metrics-port", "0", "--model", f"extra={mesh.model_dir}"],
                            port=mesh.spare, log_dir=mesh.catalog.parent)
    mesh.procs.insert(1, worker.start().wait_healthy(60))
    deadline = time.monotonic() + 20
    while httpx.post(mesh.frontend.url + "/v1/chat/completions", json=body, timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the new model's worker never served"
        time.sleep(0.2)
    assert ask(mesh, "extra")[0] == "extra"
    mesh.write(text=original)


def test_the_route_benchmark_reports_shares_cost_and_ttft(mesh: CatalogMesh) -> None:
    from bench.route_bench import drive, report, workload

    items = workload(20, 0.4, seed=3)
    assert sum(hard for hard, _ in items) == 8
    samples = asyncio.run(drive(mesh.frontend.url, "auto", items, concurrency=4, max_tokens=8))
    result = report(parse_catalog(mesh.catalog.read_text(), "catalog.yaml"), "auto", samples, 0.4)
    assert result["failed"] == 0 and result["largest"] == "large"
    assert result["models"]["large"]["hard"] == 8 and result["models"]["large"]["easy"] == 0
    assert result["models"]["small"]["share"] == pytest.approx(0.6)
    assert result["hard_to_largest"] == 1.0 and result["easy_kept_cheaper"] == 1.0
    assert 0 < result["cost_ratio"] < 1  # the cheap model's share priced at its prices
    assert all(m["ttft_p50_s"] > 0 for m in result["models"].values())


def test_a_stream_falls_back_when_its_model_has_no_worker_left(mesh: CatalogMesh) -> None:
    mesh.large.stop()
    deadline = time.monotonic() + 15
    while next(m for m in client(mesh).models.list().data if m.id == "large").model_dump()["ready"]:
        assert time.monotonic() < deadline, "the scheduler still lists large as served"
        time.sleep(0.2)
    before = mesh.metric("infermesh_frontend_fallbacks_total", from_model="large", to_model="small",
                         reason="unavailable")
    with httpx.stream("POST", mesh.frontend.url + "/v1/chat/completions", timeout=30,
                      json={"model": "chat-large", "stream": True, "max_tokens": 8,
                            "messages": [{"role": "user", "content": "Hello"}]}) as reply:
        assert reply.status_code == 200
        assert reply.headers["x-infermesh-model"] == "small"
        assert reply.headers["x-infermesh-fallback"] == "large>small"
        chunks = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
    assert chunks and {c["model"] for c in chunks} == {"small"}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert mesh.metric("infermesh_frontend_fallbacks_total", from_model="large", to_model="small",
                       reason="unavailable") == before + 1
    # Three failures within the window: large cools down, and later requests skip it (reason "cooldown").
    for _ in range(2):
        assert ask(mesh, "chat-large")[0] == "small"
    assert mesh.metric("infermesh_frontend_model_cooling", model="large") == 1
    served, headers = ask(mesh, "chat-large")
    assert served == "small" and headers["x-infermesh-fallback"] == "large>small"
    assert mesh.metric("infermesh_frontend_fallbacks_total", from_model="large", to_model="small",
                       reason="cooldown") >= 1
