"""Worker gRPC stream vs vLLM's AsyncLLM called directly in one process.

Same engine settings on both sides (the worker's own engine arguments and
sampling parameters are reused for the direct run), prompts of random
ordinary-word ids of the default model (128 tokens) and 64 output tokens each
with EOS ignored, at concurrency 1 and 16. Both engines are up at once and the
rounds alternate between them, so other load on the machine hits both alike.
Reports output tokens/s and median time to first token, and writes
docs/benchmarks/worker.md.

    .venv/bin/python -m bench.worker_bench [--compiled] [--rounds 3] [--requests-c1 8] [--requests-c16 48]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import grpc
from infermesh.common.model_prep import default_model_dir
from infermesh.gpu_worker.engine import GenerateRequest
from infermesh.gpu_worker.sim_engine import read_vocab
from infermesh.gpu_worker.vllm_engine import VllmEngine, VllmOptions
from infermesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc

from tests.harness import ServiceProcess, free_port

PROMPT_TOKENS = 128
OUTPUT_TOKENS = 64
KV_GB = 2
MAX_NUM_SEQS = 64


def make_prompts(model_dir: Path, count: int, seed: int) -> list[list[int]]:
    words = read_vocab(model_dir).words
    rng = random.Random(seed)
    return [[rng.choice(words) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


async def drive(one, prompts: list[list[int]], concurrency: int) -> dict[str, float]:
    """Runs `one(prompt) -> (ttft, tokens)` over prompts with `concurrency` in flight."""
    queue = list(prompts)
    ttfts: list[float] = []
    tokens = 0

    async def lane() -> None:
        nonlocal tokens
        while queue:
            ttft, n = await one(queue.pop())
            ttfts.append(ttft)
            tokens += n

    started = time.perf_counter()
    await asyncio.gather(*[lane() for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    return {"tok_s": tokens / elapsed, "ttft_ms": statistics.median(ttfts) * 1e3, "tokens": tokens}


class Direct:
    """AsyncLLM in this process, with the worker's engine arguments and sampling parameters."""

    def __init__(self, engine: VllmEngine) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(KV_GB)
        self.engine = engine
        self.llm = AsyncLLM.from_engine_args(engine.engine_args())
        self.counter = 0

    async def one(self, prompt: list[int]) -> tuple[float, int]:
        from vllm.inputs import TokensPrompt

        self.counter += 1
        params = self.engine.sampling_params(GenerateRequest(str(self.counter), prompt, OUTPUT_TOKENS,
                                                             ignore_eos=True, temperature=0))
        t0 = time.perf_counter()
        ttft, n = 0.0, 0
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt), params, f"d{self.counter}"):
            if n == 0:
                ttft = time.perf_counter() - t0
            n += len(out.outputs[0].token_ids)
        return ttft, n


class OverGrpc:
    """A worker process driven over loopback gRPC."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    async def one(self, prompt: list[int]) -> tuple[float, int]:
        t0 = time.perf_counter()
        ttft, n = 0.0, 0
        req = worker_pb2.GenerateTokensRequest(prompt_ids=prompt, sampling=common_pb2.SamplingParams(
            max_tokens=OUTPUT_TOKENS, temperature=0, ignore_eos=True))
        async for msg in self.stub.Generate(req):
            if n == 0 and msg.token_ids:
                ttft = time.perf_counter() - t0
            n += len(msg.token_ids)
        return ttft, n


def start_worker(model_dir: Path, compiled: bool) -> ServiceProcess:
    port = free_port()
    args = ["worker", "--port", str(port), "--metrics-port", "0", "--model", str(model_dir),
            "--max-num-seqs", str(MAX_NUM_SEQS), "--kv-cache-gb", str(KV_GB)]
    if not compiled:
        args.append("--enforce-eager")
    return ServiceProcess("worker", args, port=port).start()


def placement(log: str) -> str:
    """The worker's CPU placement, from its log."""
    lines = [line.split("CPU placement: ", 1)[1] for line in log.splitlines() if "CPU placement: " in line]
    return lines[-1] if lines else "none logged"


async def compare(model_dir: Path, engine: VllmEngine, compiled: bool, rounds: int,
                  requests: dict[int, int]) -> tuple[dict[str, dict[int, list[dict[str, float]]]], str]:
    """Both sides up at once; rounds alternate direct, worker, direct, worker (fresh prompts each)."""
    proc = start_worker(model_dir, compiled)
    try:
        await asyncio.to_thread(proc.wait_healthy, 600)
        placed = placement(proc.log())
        direct, worker = Direct(engine), OverGrpc(proc.address)
        sides = {"direct": direct, "worker": worker}
        results: dict[str, dict[int, list[dict[str, float]]]] = {k: {c: [] for c in requests} for k in sides}
        seed = 100
        for side in sides.values():  # warm-up
            await drive(side.one, make_prompts(model_dir, 8, seed=seed), 4)
        for _ in range(rounds):
            for c, count in requests.items():
                for name, side in sides.items():
                    seed += 1
                    results[name][c].append(await drive(side.one, make_prompts(model_dir, count, seed), c))
        direct.llm.shutdown()
        await worker.channel.close()
        return results, placed
    finally:
        proc.stop(timeout=60)


NOTES_MARK = "<!-- notes: text below this line is kept when the benchmark rewrites this file -->"


def write_report(path: Path, command: str, results, compiled: bool, rounds: int, placed: str) -> str:
    lines = ["# Worker benchmark: gRPC stream vs AsyncLLM in-process", "",
             f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, no GPU, Python {platform.python_version()}, "
             f"vLLM {__import__('vllm').__version__}; default model (SmolLM2-135M-Instruct, bf16), "
             f"{'compiled' if compiled else 'eager'} mode, max_num_seqs {MAX_NUM_SEQS}, KV cache {KV_GB} GiB, "
             "prefix caching on.", "",
             f"Workload: random-word prompts of {PROMPT_TOKENS} tokens (fresh prompts every round, so no prefix "
             f"hits), {OUTPUT_TOKENS} output tokens each (EOS ignored), greedy. Both engines are up at once: "
             "AsyncLLM in the benchmark process, and a worker process driven over loopback gRPC; rounds "
             f"alternate direct, worker, direct, worker ({rounds} rounds each). Medians over rounds.", "",
             f"CPU placement: vLLM binds each engine's model process to its own choice of cores (the same for "
             f"both engines); the worker, with its default `--cpus auto`, logged: {placed}. The benchmark "
             "process (the direct AsyncLLM and the gRPC client) and the direct engine's other processes are not "
             "pinned, as in a plain AsyncLLM deployment.", "",
             "| concurrency | requests/round | direct tok/s | worker tok/s | ratio | direct TTFT p50 ms | "
             "worker TTFT p50 ms | TTFT delta ms |",
             "|---|---|---|---|---|---|---|---|"]
    for c in results["direct"]:
        d = {k: statistics.median(r[k] for r in results["direct"][c]) for k in ("tok_s", "ttft_ms", "tokens")}
        w = {k: statistics.median(r[k] for r in results["worker"][c]) for k in ("tok_s", "ttft_ms", "tokens")}
        lines.append(f"| {c} | {d['tokens'] // OUTPUT_TOKENS:.0f} | {d['tok_s']:.1f} | {w['tok_s']:.1f} | "
                     f"{w['tok_s'] / d['tok_s']:.3f} | {d['ttft_ms']:.1f} | {w['ttft_ms']:.1f} | "
                     f"{w['ttft_ms'] - d['ttft_ms']:+.1f} |")
    lines += ["", "Per round (tok/s direct / worker): " + "; ".join(
        f"c{c}: " + ", ".join(f"{a['tok_s']:.0f}/{b['tok_s']:.0f}"
                              for a, b in zip(results["direct"][c], results["worker"][c], strict=True))
        for c in results["direct"]), "",
        "Targets: worker throughput >= 0.97x direct; median TTFT at most +5 ms.", "", NOTES_MARK]
    old = path.read_text() if path.exists() else ""
    if NOTES_MARK in old:
        lines.append(old.split(NOTES_MARK, 1)[1].strip("\n"))
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiled", action="store_true", help="Do not enforce eager mode (slow start).")
    parser.add_argument("--requests-c1", type=int, default=8)
    parser.add_argument("--requests-c16", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks/worker.md")
    args = parser.parse_args()
    model_dir = default_model_dir()
    engine = VllmEngine(model_dir.name, model_dir, VllmOptions(max_num_seqs=MAX_NUM_SEQS, kv_cache_gb=KV_GB,
                                                               enforce_eager=not args.compiled))
    results, placed = asyncio.run(compare(model_dir, engine, args.compiled, args.rounds,
                                  {1: args.requests_c1, 16: args.requests_c16}))
    command = " ".join([".venv/bin/python -m bench.worker_bench", *sys.argv[1:]])
    print(write_report(Path(args.out), command, results, args.compiled, args.rounds, placed))


if __name__ == "__main__":
    main()
