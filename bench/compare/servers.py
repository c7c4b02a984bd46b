"""The two sides of the comparison as processes: vLLM's OpenAI server and `infermesh up`.

Each runs in its own process group (vLLM's engine core is a child process),
is ready when `GET /health` answers 200, and is stopped with SIGTERM to the
group, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from tests.harness import free_port, port_is_bound


class Server:
    """A child process serving the OpenAI API at `url`."""

    def __init__(self, name: str, argv: Sequence[str], url: str, log: Path, env: dict[str, str] | None = None):
        self.name, self.argv, self.url, self.log_path = name, list(argv), url, log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> float:
        """Polls /health; returns the seconds it took. Fails at once if the process exits."""
        assert self.proc is not None
        started = time.monotonic()
        deadline = started + timeout
        with httpx.Client(timeout=2, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/health").status_code == 200:
                        return time.monotonic() - started
                time.sleep(1)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def stop(self, grace: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def vllm_server(model_dir: Path, served_name: str, log_dir: Path, tag: str = "vllm",
                env: dict[str, str] | None = None, extra: Sequence[str] = ()) -> Server:
    """vLLM's own OpenAI server with its default settings, on a free port."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), *extra]
    return Server(tag, argv, f"http://127.0.0.1:{port}", log_dir / f"{tag}.log", env)


def free_block(size: int = 40, low: int = 20000, high: int = 60000) -> int:
    """A base port with `size` free ports after it (for `infermesh up --ports-from`)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - size)
        if not any(port_is_bound(p) for p in range(base, base + size)):
            return base
    raise RuntimeError("no free block of ports")


def mesh(model_dir: Path, log_dir: Path, workers: int = 1, env: dict[str, str] | None = None,
         extra: Sequence[str] = ()) -> Server:
    """`infermesh up` with the vLLM engine, clients through Envoy on the block's first port."""
    base = free_block()
    argv = [sys.executable, "-m", "infermesh.cli", "up", "--ports-from", str(base), "--model", str(model_dir),
            "--workers", str(workers), "--log-dir", str(log_dir / f"mesh-{workers}w"), *extra]
    return Server(f"mesh-{workers}w", argv, f"http://127.0.0.1:{base}", log_dir / f"mesh-{workers}w.log", env)


class RoundRobinProxy:
    """A TCP proxy that hands each new connection to the next upstream in turn.

    vLLM's load generator keeps one connection per concurrent request lane, so
    connection-level round-robin spreads the lanes evenly over the servers.
    """

    def __init__(self, upstreams: Sequence[tuple[str, int]]) -> None:
        self.upstreams = list(upstreams)
        self.next = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: asyncio.AbstractServer | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.upstreams[self.next % len(self.upstreams)]
        self.next += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def serve_forever(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        async with self.server:
            await self.server.serve_forever()


def run_proxy_process(upstreams: Sequence[str]) -> subprocess.Popen[bytes]:
    """Runs a RoundRobinProxy in its own process (so it does not share the load generator's CPU)."""
    port = free_port()
    code = ("import asyncio,sys;from bench.compare.servers import RoundRobinProxy as P;"
            "p=P([(u.rsplit(':',1)[0],int(u.rsplit(':',1)[1])) for u in sys.argv[2:]]);"
            "p.port=int(sys.argv[1]);asyncio.run(p.serve_forever())")
    proc = subprocess.Popen([sys.executable, "-c", code, str(port), *upstreams], start_new_session=True,
                            cwd=Path(__file__).resolve().parents[2])
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while not port_is_bound(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the round-robin proxy did not start")
        time.sleep(0.1)
    return proc
