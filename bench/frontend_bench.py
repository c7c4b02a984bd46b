"""The mesh's own cost per token, on the simulated engine with zero latency.

Starts a tokenizer, one zero-latency simulated worker, a scheduler and one
frontend (real processes on loopback), then measures:

- streamed tokens/s that one frontend process sustains: C concurrent SSE
  streams of M tokens each (chat completions, `ignore_eos`), counted from the
  streams' own usage;
- CPU seconds per streamed token of the frontend process (and of the worker);
- the median time to first token the mesh adds: a streaming chat request
  through the frontend (render, admit, worker, detokenize, SSE) against the
  worker's Generate called directly with the same prompt ids, alternating.

    .venv/bin/python -m bench.frontend_bench [--concurrency 32] [--max-tokens 2000] [--seconds 15]
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
from pathlib import Path

import grpc
import httpx
import psutil
from infermesh.common.model_prep import default_model_dir
from infermesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.fixtures.mesh import build_sim_mesh
from tests.harness import ServiceProcess, free_port

MESSAGES = [{"role": "user", "content": "Write a long story about a mesh of small services."}]
# About 128 tokens, like the prompts of `vllm bench serve --dataset-name random --random-input-len 128`.
PROMPT = " ".join(["Tell me about a mesh of small services that scale on their own, tier by tier."] * 8)


def cpu_seconds(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        t = p.cpu_times()
        total += t.user + t.system
    return total


async def one_stream(client: httpx.AsyncClient, model: str, max_tokens: int, api: str = "chat") -> tuple[int, int]:
    """Streams one request; returns (tokens, SSE events), reading the usage of the last event."""
    body = {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if api == "chat":
        body["messages"] = MESSAGES
    else:
        body["prompt"] = PROMPT
    tail = b""
    events = 0
    async with client.stream("POST", "/v1/chat/completions" if api == "chat" else "/v1/completions",
                             json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {await reply.aread()!r}")
        async for chunk in reply.aiter_raw():
            joined = tail[-8:] + chunk
            events += joined.count(b"data: ") - tail[-8:].count(b"data: ")
            tail = (tail + chunk)[-4096:]
    usage_line = [x for x in tail.split(b"\n\n") if b'"usage"' in x][-1]
    return json.loads(usage_line[6:])["usage"]["completion_tokens"], events


async def throughput(url: str, model: str, frontend_pid: int, worker_pid: int, concurrency: int,
                     max_tokens: int, seconds: float, api: str = "chat", tokenizer_pid: int = 0) -> dict[str, float]:
    tokens = events = requests = 0
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await one_stream(client, model, 10, api)  # warm up (tokenizer definition, channels)
        cpu_front, cpu_worker = cpu_seconds(frontend_pid), cpu_seconds(worker_pid)
        cpu_tok = cpu_seconds(tokenizer_pid) if tokenizer_pid else 0.0
        started = time.perf_counter()
        stop_at = started + seconds

        async def loop() -> None:
            nonlocal tokens, events, requests
            while time.perf_counter() < stop_at:
                n, e = await one_stream(client, model, max_tokens, api)
                tokens += n
                events += e
                requests += 1
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu_front = cpu_seconds(frontend_pid) - cpu_front
        cpu_worker = cpu_seconds(worker_pid) - cpu_worker
        cpu_tok = cpu_seconds(tokenizer_pid) - cpu_tok if tokenizer_pid else 0.0
    return {"api": api, "concurrency": concurrency, "max_tokens": max_tokens, "requests": requests, "tokens": tokens,
            "seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed),
            "tokens_per_sse_event": round(tokens / max(1, events), 1),
            "frontend_cpu_s": round(cpu_front, 2), "frontend_cpu_util": round(cpu_front / elapsed, 2),
            "frontend_cpu_us_per_token": round(cpu_front / tokens * 1e6, 2),
            "frontend_cpu_ms_per_request": round(cpu_front / max(1, requests) * 1e3, 3),
            "worker_cpu_us_per_token": round(cpu_worker / tokens * 1e6, 2),
            "tokenizer_cpu_ms_per_request": round(cpu_tok / max(1, requests) * 1e3, 3)}


async def ttft(url: str, model: str, tokenizer: str, worker: str, rounds: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(tokenizer) as tch, grpc.aio.insecure_channel(worker) as wch:
        rendered = await tokenizer_pb2_grpc.TokenizerStub(tch).Render(tokenizer_pb2.RenderRequest(
            model=model, messages=[common_pb2.ChatMessage(**m) for m in MESSAGES], max_tokens=4))
        stub = worker_pb2_grpc.WorkerStub(wch)
        request = worker_pb2.GenerateTokensRequest(model=model, prompt_ids=rendered.token_ids,
                                                   sampling=common_pb2.SamplingParams(max_tokens=4))
        body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "stream": True}
        direct, mesh = [], []
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for i in range(rounds + 5):
                t = time.perf_counter()
                async for _ in stub.Generate(request):
                    d = time.perf_counter() - t
                    break
                t = time.perf_counter()
                async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                    async for line in reply.aiter_lines():
                        if line.startswith("data: ") and '"content":""' not in line:
                            m = time.perf_counter() - t
                            break
                if i >= 5:  # the first rounds warm up connections and caches
                    direct.append(d)
                    mesh.append(m)
    return {"rounds": rounds, "direct_worker_ttft_ms_p50": round(statistics.median(direct) * 1e3, 2),
            "mesh_ttft_ms_p50": round(statistics.median(mesh) * 1e3, 2),
            "added_ttft_ms_p50": round((statistics.median(mesh) - statistics.median(direct)) * 1e3, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", nargs="+", default=["0:32:2000", "2:64:500", "5:160:300"],
                        help="ITL_MS:CONCURRENCY:MAX_TOKENS of the simulated worker and the load; ITL 0 is the "
                             "zero-latency engine (it sends every due token in one message), a small ITL makes "
                             "it send about one token per message per stream")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--api", choices=["chat", "completions"], default="chat",
                        help="chat: a short chat; completions: a ~128-token text prompt to /v1/completions")
    parser.add_argument("--ttft-rounds", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/frontend.json"))
    args = parser.parse_args(argv)
    model_dir = default_model_dir()
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "infermesh-frontend-bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tokenizer = ServiceProcess("tokenizer", ["tokenizer", "--port", str(port), "--metrics-port", "0",
                                             "--model", str(model_dir)], port=port, log_dir=log_dir)
    tokenizer.start().wait_healthy(60)
    rows = []
    latency: dict[str, float] = {}
    try:
        for scenario in args.scenario:
            itl, concurrency, max_tokens = scenario.split(":")
            mesh = build_sim_mesh(log_dir, model_dir, tokenizer, workers=1, sim_ttft_ms=0, sim_itl_ms=float(itl),
                                  sim_prompt_token_ms=0, max_num_seqs=1024)
            try:
                row = asyncio.run(throughput(mesh.url, mesh.model, mesh.frontend.pid, mesh.workers[0].pid,
                                             int(concurrency), int(max_tokens), args.seconds, args.api,
                                             tokenizer.pid))
                row = {"sim_itl_ms": float(itl), **row}
                print(json.dumps(row), flush=True)
                rows.append(row)
                if not latency and float(itl) == 0:
                    latency = asyncio.run(ttft(mesh.url, mesh.model, tokenizer.address, mesh.workers[0].address,
                                               args.ttft_rounds))
                    print(json.dumps(latency), flush=True)
            finally:
                mesh.stop()
    finally:
        tokenizer.stop()
    doc = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
           "engine": "sim (zero latency)", "throughput": rows, "ttft": latency,
           "command": "python -m bench.frontend_bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
