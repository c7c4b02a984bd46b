"""Tokenizer service vs transformers' apply_chat_template in-process.

Renders 100-token and 4,000-token chats at concurrency 1 and 16, through the
tokenizer service over gRPC (a real process on loopback, RPC included) and
through `transformers`' `apply_chat_template(tokenize=True)` in this process,
on the same inputs, alternating A B A B. Reports throughput and p50/p99
latency, and the ratio service / transformers.

    .venv/bin/python -m bench.tokenizer_bench [--requests 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from infermesh.common.model_prep import default_model_dir
from infermesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

from tests.harness import ServiceProcess, free_port

WORDS = ("the model serves tokens over a mesh of small services and each one scales on its own "
         "while the scheduler keeps prefix caches warm").split()


def make_chat(tokenizer, target_tokens: int) -> list[dict[str, str]]:
    """A system+user chat whose rendered length is close to `target_tokens`."""
    words = []
    while True:
        words.extend(WORDS)
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": " ".join(words)}]
        n = len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
        if n >= target_tokens:
            return messages


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(latencies: list[float], elapsed: float) -> dict[str, float]:
    return {"rps": len(latencies) / elapsed, "p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3}


def run_transformers(tokenizer, messages, requests: int, concurrency: int) -> dict[str, float]:
    def one(_: int) -> float:
        t = time.perf_counter()
        tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return time.perf_counter() - t

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests)))
    return summarize(latencies, time.perf_counter() - started)


async def run_service(address: str, model: str, messages, requests: int, concurrency: int) -> dict[str, float]:
    request = tokenizer_pb2.RenderRequest(model=model, messages=[common_pb2.ChatMessage(**m) for m in messages])
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        await stub.Render(request)  # connect
        queue = list(range(requests))

        async def client() -> None:
            while queue:
                queue.pop()
                t = time.perf_counter()
                await stub.Render(request)
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return summarize(latencies, time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/tokenizer.json"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chats = {100: make_chat(tokenizer, 100), 4000: make_chat(tokenizer, 4000)}
    port = free_port()
    proc = ServiceProcess("tokenizer", ["tokenizer", "--port", str(port), "--metrics-port", "0",
                                        "--model", str(model_dir)], port=port).start().wait_healthy()
    results: list[dict[str, object]] = []
    try:
        for size, messages in chats.items():
            for concurrency in (1, 16):
                runs: dict[str, list[dict[str, float]]] = {"transformers": [], "service": []}
                for _ in range(args.rounds):  # A B A B
                    runs["transformers"].append(run_transformers(tokenizer, messages, args.requests, concurrency))
                    runs["service"].append(asyncio.run(run_service(proc.address, model_dir.name, messages,
                                                                   args.requests, concurrency)))
                row: dict[str, object] = {"tokens": size, "concurrency": concurrency}
                for side, samples in runs.items():
                    row[side] = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
                row["throughput_ratio"] = row["service"]["rps"] / row["transformers"]["rps"]  # type: ignore[index]
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        proc.stop()
    doc = {"command": "make bench-tokenizer (python -m bench.tokenizer_bench)", "machine": machine(),
           "requests": args.requests, "rounds": args.rounds, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def machine() -> dict[str, object]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "processor": platform.processor() or platform.machine()}


if __name__ == "__main__":
    sys.exit(main())
