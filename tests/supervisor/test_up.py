"""`infermesh up` for real (simulated engine, a free block of ports): it starts
the mesh behind Envoy and prints a working curl, restarts a killed child,
stops everything on Ctrl-C leaving no process and no port, and fails fast with
one clear line on a bad start."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from infermesh.supervisor.ports import port_free
from infermesh.supervisor.readiness import grpc_status

from tests.supervisor.up_process import UpProcess, free_block

SERVING = 1


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    proc = UpProcess(tmp_path_factory.mktemp("up"), workers=2).start()
    try:
        yield proc.wait_up()
    finally:
        proc.cleanup()


def test_prints_the_url_and_a_curl_that_works(up: UpProcess) -> None:
    out = up.output()
    assert "infermesh is up after" in out and up.url in out
    for name in ("tokenizer", "scheduler", "worker-0", "worker-1", "frontend-0", "envoy"):
        assert (up.log_dir / f"{name}.log").stat().st_size > 0, name
    assert f"logs: {up.log_dir}" in out
    (curl,) = re.findall(r"^\[infermesh up\]\s+(curl -N .*)$", out, re.MULTILINE)
    result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [line for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert len(events) > 2 and events[-1] == "data: [DONE]"


def test_a_killed_child_is_restarted(up: UpProcess) -> None:
    worker = up.child("worker", up.plan.workers[0].grpc)
    worker.kill()
    up.wait_for("worker-0 is ready again", timeout=60)
    assert "worker-0 exited (code -9); restarting in 1 s" in up.output()
    restarted = up.child("worker", up.plan.workers[0].grpc)
    assert restarted.pid != worker.pid
    assert grpc_status(f"127.0.0.1:{up.plan.workers[0].grpc}") == SERVING
    # A second crash backs off longer.
    restarted.kill()
    up.wait_for("worker-0 is ready again", timeout=60, count=2)
    assert "restarting in 2 s (restart 2" in up.output()


def test_ctrl_c_leaves_no_process_and_no_port(up: UpProcess) -> None:
    up.record_pids()
    assert len(up.seen_pids) >= 6
    up.signal(signal.SIGINT)
    assert up.wait(timeout=90) == 0
    out = up.output()
    order = [out.index(f"stopping {kind}") for kind in ("frontend", "workers", "scheduler", "tokenizer", "envoy")]
    assert order == sorted(order), out
    assert out.rstrip().endswith("stopped")
    assert up.leftovers() == []
    bound = [(label, port) for label, port in up.plan.labelled() if not port_free("127.0.0.1", port)]
    assert bound == []


def run_up(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infermesh.cli", "up", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_a_port_in_use_fails_before_anything_starts(tmp_path: Path) -> None:
    base = free_block(1, 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 4))  # the scheduler's
        taken.listen()
        started = time.monotonic()
        result = run_up("--engine", "sim", "--workers", "1", "--ports-from", str(base), "--log-dir", str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip() == (f"infermesh up: port already in use: {base + 4} (scheduler gRPC); "
                                     "stop what uses it or move the mesh with --ports-from BASE")
    assert "starting" not in result.stdout
    assert list(tmp_path.iterdir()) == []
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("make_dir, message", [
    (lambda tmp: tmp / "no-such-model", "does not exist"),
    (lambda tmp: tmp, "is not a model directory (it needs config.json and tokenizer.json)"),
])
def test_a_missing_model_fails_with_one_line(tmp_path: Path, make_dir: object, message: str) -> None:
    model = make_dir(tmp_path)  # type: ignore[operator]
    result = run_up("--engine", "sim", "--model", str(model), "--ports-from", str(free_block(1, 1)),
                    "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "starting" not in result.stdout


def test_bad_options_fail_with_one_line() -> None:
    result = run_up("--engine", "sim", "--max-num-seqs", "-3")
    assert result.returncode == 2 and "max_num_seqs must be >= 0" in result.stderr
    result = run_up("--engine", "sim", "--no-such-option", "1")
    assert result.returncode == 2 and "unknown option(s): --no-such-option 1" in result.stderr
    result = run_up("--workers", "0")
    assert result.returncode == 2 and "at least 1" in result.stderr


def test_a_child_failing_at_start_up_stops_the_mesh(tmp_path: Path, model_dir: Path) -> None:
    """A model directory whose tokenizer.json is broken: the tokenizer exits,
    `up` says so with the end of its log, stops, and leaves nothing behind."""
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text((model_dir / "config.json").read_text())
    (model / "tokenizer.json").write_text("{ not json")
    proc = UpProcess(tmp_path / "logs", "--model", str(model), workers=1)
    proc.start()
    try:
        code = proc.wait(timeout=60)
        proc.record_pids()
    finally:
        proc.cleanup()
    assert code == 1
    out = proc.output()
    assert "infermesh up: tokenizer exited with code" in out and "before it was ready" in out
    assert str(tmp_path / "logs" / "tokenizer.log") in out
    assert "starting the scheduler" not in out
    assert all(port_free("127.0.0.1", port) for _, port in proc.plan.labelled())


def test_ctrl_c_while_starting_leaves_nothing(tmp_path: Path) -> None:
    proc = UpProcess(tmp_path, workers=2).start()
    try:
        proc.wait_for("starting workers", timeout=60)
        proc.signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        proc.record_pids()
    finally:
        proc.cleanup()
    assert code == 0
    assert "infermesh is up" not in proc.output() and proc.output().rstrip().endswith("stopped")
    assert proc.leftovers() == []
    assert all(port_free("127.0.0.1", port) for _, port in proc.plan.labelled())


def test_without_envoy_the_url_is_the_frontend(tmp_path: Path) -> None:
    proc = UpProcess(tmp_path, "--no-envoy", workers=1).start()
    try:
        proc.wait_up()
        url = f"http://127.0.0.1:{proc.plan.frontends[0].http}"
        assert "infermesh is up after" in proc.output() and url in proc.output()
        assert "grpcurl" not in proc.output() and not (tmp_path / "envoy.log").exists()
        assert port_free("127.0.0.1", proc.plan.edge)
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert proc.leftovers() == []
    finally:
        proc.cleanup()
