"""`infermesh probe`, the containers' HEALTHCHECK, against a real service."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.harness import ServiceProcess, free_port


def probe(*args: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if port is not None:
        env["INFERMESH_PORT"] = str(port)
    return subprocess.run([sys.executable, "-m", "infermesh.cli", "probe", *args], capture_output=True, text=True,
                          timeout=30, env=env)


def test_probe_of_a_serving_service_by_its_port_variable(tokenizer_proc: ServiceProcess) -> None:
    assert probe(port=tokenizer_proc.port).returncode == 0
    assert probe("--grpc", tokenizer_proc.address, "--service", "infermesh.v1.Tokenizer").returncode == 0


def test_probe_of_nothing_fails_with_a_reason() -> None:
    port = free_port()
    result = probe(port=port)
    assert result.returncode == 1
    assert result.stderr.strip() == f"unhealthy: gRPC health of 127.0.0.1:{port}: no answer"
    result = probe("--http", f"http://127.0.0.1:{port}/health")
    assert result.returncode == 1 and "answered nothing" in result.stderr


def test_probe_of_an_unknown_health_service(tokenizer_proc: ServiceProcess) -> None:
    result = probe("--grpc", tokenizer_proc.address, "--service", "no.such.Service")
    assert result.returncode == 1
    assert result.stderr.strip() == f"unhealthy: gRPC health of {tokenizer_proc.address}: SERVICE_UNKNOWN"
