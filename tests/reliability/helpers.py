"""Helpers of the reliability suite: client load, process accounting, restarts on the same port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.frontend.sse import SseResult, stream_sse
from tests.harness import ServiceProcess


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children (a service may run helpers)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def tree_fds(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.num_fds() for p in [proc, *proc.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def restart_same_port(proc: ServiceProcess, timeout: float = 60.0) -> ServiceProcess:
    """A new process with the same arguments (so the same ports) once `proc` has exited."""
    fresh = ServiceProcess(proc.name, proc.args, port=proc.port, log_dir=proc.log_path.parent)
    for attr in ("metrics_port", "http_port"):
        if hasattr(proc, attr):
            setattr(fresh, attr, getattr(proc, attr))
    fresh.__class__ = proc.__class__
    return fresh.start().wait_healthy(timeout)


def stream_ok(result: SseResult, max_tokens: int) -> bool:
    """Whole: 200, no error event, [DONE], finished by length with every token."""
    return (result.status == 200 and not result.errors and bool(result.events)
            and result.events[-1] == "[DONE]" and result.finish() == "length"
            and bool(result.usage) and result.usage["completion_tokens"] == max_tokens)


@dataclass
class Load:
    """Steady load: `clients` loops of streamed completions until stopped."""

    url: str
    model: str
    clients: int = 8
    max_tokens: int = 20
    headers: dict[str, str] = field(default_factory=dict)
    phase: str = ""
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def body(self, i: int) -> dict[str, Any]:
        return {"model": self.model, "prompt": f"Steady load request {i}", "max_tokens": self.max_tokens,
                "seed": i, "stream_options": {"include_usage": True}}

    async def _client(self, index: int, client: httpx.AsyncClient) -> None:
        i = index
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                result = await stream_sse(client, "/v1/completions", self.body(i), headers=self.headers)
            except httpx.HTTPError as exc:
                self.failures.append(f"{self.phase}: {type(exc).__name__}: {exc}")
            else:
                if stream_ok(result, self.max_tokens):
                    self.ok += 1
                    self.latencies.append(time.monotonic() - started)
                else:
                    self.failures.append(f"{self.phase}: status {result.status} errors {result.errors} "
                                         f"finish {result.finish() if result.status == 200 else None} "
                                         f"from {result.headers.get('server', '?')} "
                                         f"{result.headers.get('x-envoy-upstream-service-time', '')}")
            i += self.clients

    async def __aenter__(self) -> Load:
        self._client_obj = httpx.AsyncClient(base_url=self.url, timeout=60,
                                             limits=httpx.Limits(max_connections=self.clients * 2))
        self._tasks = [asyncio.create_task(self._client(i, self._client_obj)) for i in range(self.clients)]
        return self

    async def wait_ok(self, count: int, timeout: float = 30.0) -> None:
        """Until `count` more requests succeeded."""
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target:
            assert time.monotonic() < deadline, f"load stalled: {self.ok}/{target} ok, failures {self.failures[:3]}"
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._client_obj.aclose()


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def log_paths(procs: Sequence[ServiceProcess]) -> list[Path]:
    return [p.log_path for p in procs]
