"""A small open-loop load generator for the overload scenario.

`vllm bench serve` counts a refused request as failed but keeps no time for
it, so this one records, for every request, the HTTP status, when the status
arrived, the time to the first token and when the stream ended. Arrivals are
Poisson at a fixed rate for a fixed window; streamed completions, like vLLM's
load generator sends them (`/v1/completions`, `stream`, `ignore_eos`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp


@dataclass
class Outcome:
    start: float  # seconds since the window opened
    status: int = 0  # HTTP status; 0 when the connection failed or the request was cut off
    status_s: float | None = None  # seconds until the status line arrived
    ttft_s: float | None = None
    end_s: float | None = None  # seconds until the stream ended (completed requests)
    tokens: int = 0
    completed: bool = False
    error: str = ""
    retry_after: str = ""  # a refusal's Retry-After header
    message: str = ""  # a refusal's error message (why: a full queue, an expected wait, a wait run out)


def random_prompts(model_dir: Path, count: int, length: int, seed: int) -> list[str]:
    """Texts of `length` random ordinary-word tokens of the model's vocabulary."""
    from infermesh.gpu_worker.sim_engine import read_vocab
    from tokenizers import Tokenizer

    words = read_vocab(model_dir).words
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rng = random.Random(seed)
    return [tokenizer.decode([rng.choice(words) for _ in range(length)]) for _ in range(count)]


async def _one(session: aiohttp.ClientSession, url: str, body: dict, opened: float) -> Outcome:
    sent = time.perf_counter()
    out = Outcome(start=sent - opened)
    try:
        async with session.post(url, json=body) as reply:
            out.status = reply.status
            out.status_s = time.perf_counter() - sent
            if reply.status != 200:
                raw = await reply.read()
                out.error = reply.reason or ""
                out.retry_after = reply.headers.get("Retry-After", "")
                try:
                    out.message = str(json.loads(raw)["error"]["message"])[:300]
                except (ValueError, KeyError, TypeError):
                    out.message = raw[:300].decode(errors="replace")
                return out
            buffer = b""
            async for chunk in reply.content.iter_any():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    data = json.loads(event[6:])
                    if data.get("error"):
                        out.error = "error event in the stream: " + str(data["error"].get("type") or data["error"])
                    elif data.get("choices"):
                        if out.ttft_s is None:
                            out.ttft_s = time.perf_counter() - sent
                    elif data.get("usage"):
                        out.tokens = data["usage"].get("completion_tokens", 0)
            out.end_s = time.perf_counter() - sent
            out.completed = out.ttft_s is not None
    except asyncio.CancelledError:
        out.error = "cut off after the drain period"
    except aiohttp.ClientError as exc:
        out.error = type(exc).__name__
    return out


async def run(url: str, model: str, prompts: list[str], rate: float, seconds: float, output_len: int,
              drain: float, seed: int) -> list[Outcome]:
    """Sends requests at `rate`/s (Poisson) for `seconds`; waits up to `drain` s for the rest."""
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None)
    tasks: list[asyncio.Task[Outcome]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        opened = time.perf_counter()
        due = 0.0
        i = 0
        while due < seconds:
            delay = opened + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": output_len,
                    "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(_one(session, url + "/v1/completions", body, opened)))
            i += 1
            due += rng.expovariate(rate)
        window_end = time.perf_counter()
        await asyncio.wait(tasks, timeout=max(0.0, window_end + drain - time.perf_counter()))
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks)
    return list(outcomes)


def to_json(outcomes: list[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]
