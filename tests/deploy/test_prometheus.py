"""A real Prometheus server (Debian's `prometheus`) scrapes every service of a
mesh started by `infermesh up --engine sim`, and every metric the Grafana
dashboard queries is among what it scraped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.debian import ensure_prometheus
from tests.deploy.grpc_reflect import ReflectedClient
from tests.harness import free_port
from tests.supervisor.up_process import UpProcess

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "infermesh-dashboard.json"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    up = UpProcess(tmp_path_factory.mktemp("prom-mesh"), workers=2, frontends=2).start()
    try:
        up.wait_up()
        yield up
        up.signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0
        assert up.leftovers() == []
    finally:
        up.cleanup()


def scrape_config(up: UpProcess) -> dict[str, Any]:
    p = up.plan

    def job(name: str, ports: list[int], path: str = "/metrics") -> dict[str, Any]:
        return {"job_name": name, "metrics_path": path,
                "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in ports]}]}

    return {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": [
        job("tokenizer", [p.tokenizer_metrics]),
        job("scheduler", [p.scheduler_metrics]),
        job("worker", [w.metrics for w in p.workers]),
        job("frontend", [f.http for f in p.frontends]),
        job("envoy", [p.admin], "/stats/prometheus"),
    ]}


@pytest.fixture(scope="module")
def prometheus(mesh: UpProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary, _ = ensure_prometheus()
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(yaml.safe_dump(scrape_config(mesh)))
    port = free_port()
    with open(work / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]


def poll(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout}s; last: {last}")


def traffic(up: UpProcess, model: str) -> None:
    """Requests that make every labelled series appear."""
    for stream in (True, False):
        reply = httpx.post(up.url + "/v1/chat/completions", timeout=30, json={
            "model": model, "stream": stream, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hello there"}]})
        assert reply.status_code == 200, reply.text
    with ReflectedClient(f"127.0.0.1:{up.plan.edge}") as client:
        chunks = list(client.call_stream("infermesh.v1.Inference/Generate",
                                         {"model": model, "prompt": "Hi", "sampling": {"max_tokens": 2}}))
        assert chunks


def test_prometheus_scrapes_every_service(mesh: UpProcess, prometheus: str) -> None:
    expected = {"tokenizer": 1, "scheduler": 1, "worker": 2, "frontend": 2, "envoy": 1}

    def all_up() -> list[dict[str, Any]] | None:
        targets = api(prometheus, "targets")["activeTargets"]
        up = [t for t in targets if t["health"] == "up"]
        return targets if len(up) == sum(expected.values()) == len(targets) else None

    targets = poll("every target up", all_up)
    jobs: dict[str, int] = {}
    for target in targets:
        jobs[target["labels"]["job"]] = jobs.get(target["labels"]["job"], 0) + 1
    assert jobs == expected
    result = api(prometheus, "query", query="up")["result"]
    assert sorted(float(r["value"][1]) for r in result) == [1.0] * 7


def dashboard_metrics() -> set[str]:
    text = DASHBOARD.read_text()
    exprs = [t["expr"] for p in json.loads(text)["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 30
    names = set()
    for expr in exprs:
        # Label names (in `by (...)` and `{...}` matchers) are not metrics.
        expr = re.sub(r"by \([^)]*\)|\{[^}]*\}", "", expr)
        names.update(re.findall(r"\b((?:infermesh_|vllm:|envoy_)[A-Za-z0-9_:]*)", expr))
    return names


def test_every_dashboard_metric_is_scraped(mesh: UpProcess, prometheus: str) -> None:
    traffic(mesh, "SmolLM2-135M-Instruct")
    names = dashboard_metrics()
    assert any(n.startswith("vllm:") for n in names) and any(n.startswith("infermesh_scheduler_") for n in names)

    def missing() -> list[str]:
        known = set(api(prometheus, "label/__name__/values"))
        # Metadata also covers families without samples yet (counters of
        # failures that have not happened), which `values` cannot show.
        known |= set(api(prometheus, "metadata"))
        suffixes = ("_bucket", "_total", "_count", "_sum")
        absent = [n for n in names if n not in known and not (n.endswith(suffixes) and
                                                              re.sub(r"_(bucket|total|count|sum)$", "", n) in known)]
        return absent

    deadline = time.monotonic() + 30
    absent = missing()
    while absent and time.monotonic() < deadline:
        time.sleep(0.5)
        absent = missing()
    assert absent == []
