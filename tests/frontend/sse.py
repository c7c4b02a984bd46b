"""Helpers for the frontend's tests: raw SSE reading and worker metrics."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class SseResult:
    status: int
    headers: httpx.Headers
    events: list[Any] = field(default_factory=list)  # decoded JSON events, "[DONE]" as the string
    comments: int = 0

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e, dict) and "choices" in e]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e, dict) and "error" in e]

    def text(self, index: int = 0) -> str:
        out = []
        for c in self.chunks:
            for ch in c["choices"]:
                if ch["index"] == index:
                    out.append(ch.get("text") or (ch.get("delta") or {}).get("content") or "")
        return "".join(out)

    def finish(self, index: int = 0) -> str | None:
        reasons = [ch["finish_reason"] for c in self.chunks for ch in c["choices"]
                   if ch["index"] == index and ch["finish_reason"]]
        assert len(reasons) <= 1, reasons
        return reasons[0] if reasons else None

    @property
    def usage(self) -> dict[str, Any] | None:
        found = [e["usage"] for e in self.events if isinstance(e, dict) and e.get("usage")]
        return found[-1] if found else None


def parse_sse(body: str, result: SseResult) -> None:
    for block in body.split("\n\n"):
        for line in block.splitlines():
            if line.startswith(":"):
                result.comments += 1
            elif line.startswith("data: "):
                data = line[6:]
                result.events.append(data if data == "[DONE]" else json.loads(data))


async def stream_sse(client: httpx.AsyncClient, path: str, body: dict[str, Any],
                     headers: dict[str, str] | None = None, read_delay: float = 0.0) -> SseResult:
    """Posts a streaming request and reads the whole SSE body (optionally slowly)."""
    import asyncio

    async with client.stream("POST", path, json={**body, "stream": True}, headers=headers) as reply:
        result = SseResult(reply.status_code, reply.headers)
        raw = []
        async for chunk in reply.aiter_raw():
            raw.append(chunk)
            if read_delay:
                await asyncio.sleep(read_delay)
        parse_sse(b"".join(raw).decode(), result)
    return result


def metric_value(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if re.match(re.escape(name) + r"(\{|\s)", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def wait_for(condition: Any, timeout: float, interval: float = 0.05) -> float:
    """Polls until `condition()` is true; returns the seconds it took (AssertionError on timeout)."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
