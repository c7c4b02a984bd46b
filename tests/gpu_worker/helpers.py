"""Small clients for the worker tests: run a Generate stream, read load reports and metrics."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import grpc
from infermesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc


@dataclass
class Choice:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    stop_token_id: int | None = None
    logprobs: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # arrival time of each message with tokens
    sizes: list[int] = field(default_factory=list)  # tokens in each message with tokens


@dataclass
class Result:
    choices: dict[int, Choice]
    prompt_tokens: int
    cached_tokens: int
    started: float

    @property
    def ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def finish(self) -> str:
        return self.choices[0].finish_reason

    @property
    def ttft(self) -> float:
        return self.choices[0].times[0] - self.started


def request(prompt: list[int], *, model: str = "", lease_id: str = "", generated: list[int] | None = None,
            request_id: str = "", **sampling: Any) -> worker_pb2.GenerateTokensRequest:
    return worker_pb2.GenerateTokensRequest(
        model=model, lease_id=lease_id, prompt_ids=prompt, generated_ids=generated or [],
        context=common_pb2.RequestContext(request_id=request_id),
        sampling=common_pb2.SamplingParams(**sampling))


async def generate(stub: worker_pb2_grpc.WorkerStub, prompt: list[int], **kwargs: Any) -> Result:
    started = time.perf_counter()
    result = Result({}, 0, 0, started)
    async for msg in stub.Generate(request(prompt, **kwargs)):
        choice = result.choices.setdefault(msg.index, Choice())
        assert not choice.finish_reason, "a message after the choice's last one"
        if msg.token_ids:
            choice.times.append(time.perf_counter())
            choice.sizes.append(len(msg.token_ids))
        choice.token_ids += list(msg.token_ids)
        choice.logprobs += list(msg.logprobs)
        choice.finish_reason = msg.finish_reason
        if msg.HasField("stop_token_id"):
            choice.stop_token_id = msg.stop_token_id
        result.prompt_tokens, result.cached_tokens = msg.prompt_tokens, msg.cached_tokens
    return result


def stub(address: str) -> tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]:
    channel = grpc.aio.insecure_channel(address)
    return channel, worker_pb2_grpc.WorkerStub(channel)


def metrics_text(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples (over labels) in Prometheus text."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    values = [float(v) for v in pattern.findall(text)]
    assert values, f"metric {name} not exported"
    return sum(values)


async def eventually(condition: Any, timeout: float, interval: float = 0.05) -> bool:
    """Polls `condition()` until it is true or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(interval)
    return bool(condition())
