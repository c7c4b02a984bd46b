"""`infermesh up --catalog FILE` for real (simulated engines): each model of the catalog gets its own workers,
every service reads the file, and clients use the catalog's names through Envoy; an invalid catalog stops it
before anything starts, with the line and the field."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.supervisor.up_process import UpProcess

CATALOG = """
format: 1
models:
  - name: small
    weights: {{dir: {model}}}
    aliases: [chat-small]
    workers: 2
    engine: {{max_model_len: 1024}}
  - name: large
    weights: {{dir: {model}}}
    aliases: [chat-large]
    tier: standard
    engine: {{max_model_len: 512}}
routes:
  - name: auto
    default: chat-small
    rules:
      - model: chat-large
        when: {{keywords: [python]}}
fallbacks:
  - chain: [chat-large, chat-small]
"""


@pytest.fixture(scope="module")
def up(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    logs = tmp_path_factory.mktemp("up-catalog")
    catalog = logs / "catalog.yaml"
    catalog.write_text(CATALOG.format(model=model_dir))
    proc = UpProcess(logs, workers=3)
    at = proc.args.index("--workers")
    del proc.args[at:at + 2]
    proc.args += ["--catalog", str(catalog)]
    proc.start()
    try:
        yield proc.wait_up()
    finally:
        proc.cleanup()


def test_each_model_gets_its_workers_and_its_engine_options(up: UpProcess) -> None:
    out = up.output()
    assert "3 worker(s)" in out
    assert "worker-0: small" in out and "worker-1: small" in out and "worker-2: large" in out
    cards = {m["id"]: m for m in httpx.get(up.url + "/v1/models", timeout=10).json()["data"]}
    assert cards["small"]["max_model_len"] == 1024 and cards["large"]["max_model_len"] == 512
    assert cards["chat-large"]["parent"] == "large" and cards["auto"]["kind"] == "route"
    assert all(cards[name]["ready"] for name in ("small", "large", "auto"))


def test_clients_use_the_catalogs_names_through_envoy(up: UpProcess) -> None:
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="chat-large", max_tokens=4,
                                           messages=[{"role": "user", "content": "Hello"}])
    assert reply.model == "large"
    routed = client.chat.completions.with_raw_response.create(
        model="auto", max_tokens=4, messages=[{"role": "user", "content": "Some python, please"}])
    assert routed.parse().model == "large" and routed.headers["x-infermesh-model"] == "large"


def test_sighup_reloads_the_catalog_in_the_services_that_read_it(up: UpProcess) -> None:
    assert up.proc is not None
    up.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    logs = ("tokenizer", "scheduler", "frontend-0")
    while not all("SIGHUP: reloading the catalog" in (up.log_dir / f"{n}.log").read_text() for n in logs):
        assert time.monotonic() < deadline, "SIGHUP did not reach every service that reads the catalog"
        time.sleep(0.1)
    assert "SIGHUP" not in (up.log_dir / "worker-0.log").read_text()
    assert up.proc.poll() is None and httpx.get(up.url + "/health", timeout=5).status_code == 200


def test_an_invalid_catalog_stops_up_before_anything_starts(tmp_path: Path) -> None:
    bad = tmp_path / "catalog.yaml"
    bad.write_text("format: 1\nmodels:\n  - name: small\n    weights: {dir: /nowhere}\n    tier: gold\n")
    result = subprocess.run([sys.executable, "-m", "infermesh.cli", "up", "--engine", "sim", "--catalog", str(bad),
                             "--log-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{bad}:5: models[0].tier" in result.stderr
    assert not (tmp_path / "tokenizer.log").exists()
