"""Scheduler benchmark: routing policies over simulated workers, and raw admission speed.

Routing: four simulated workers whose KV cache (and so prefix cache) holds
about four 1,000-token prompts each, and a workload in which 8 long system
prompts (1,000 tokens each) are shared by many requests, each with its own
short user turn. Every policy gets fresh workers (cold caches) and the same
request sequence, sent by a fixed number of concurrent clients that each
Admit, then Generate on the leased worker. Reported per policy: the prefix
cache hit rate (cached prompt tokens over prompt tokens, from the workers'
replies; and the workers' own reported rate), mean and p99 time to first
token (from the Admit call to the first token), and throughput.

Admission: one scheduler over workers too large to fill; clients call Admit
(and Release) as fast as they can: admissions per second and admission
latency (p50, p99).

    .venv/bin/python -m bench.scheduler_bench [--requests 600] [--concurrency 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from infermesh.common.prefix import DEFAULT_BLOCK_SIZE, block_hashes, cache_salt
from infermesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.fixtures.scheduler import list_workers, start_scheduler
from tests.fixtures.worker import start_sim_worker

POLICIES = ("round_robin", "least_load", "prefix_affinity")
SYSTEM_TOKENS, USER_TOKENS, SYSTEM_PROMPTS = 1000, 24, 8


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def workload(requests: int, seed: int = 7) -> list[list[int]]:
    """Prompts: one of 8 shared system prompts, then a user turn of its own."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1000, 40_000) for _ in range(SYSTEM_TOKENS)] for _ in range(SYSTEM_PROMPTS)]
    return [systems[rng.randrange(SYSTEM_PROMPTS)] + [rng.randrange(1000, 40_000) for _ in range(USER_TOKENS)]
            for _ in range(requests)]


async def prefix_of(sched, model: str) -> Callable[[Sequence[int]], list[int]]:
    """How the frontend hashes prompts of `model`: over its workers' block size, salted with the model."""
    cards = (await sched.ListModels(common_pb2.ListModelsRequest(), timeout=10)).models
    block_size = next((c.block_size for c in cards if c.id == model), 0) or DEFAULT_BLOCK_SIZE
    return lambda ids: block_hashes(ids, block_size, cache_salt(model))


async def one_request(sched, channels, model: str, prompt: list[int], max_tokens: int, out: dict,
                      hashes: list[int]) -> None:
    started = time.perf_counter()
    lease = await sched.Admit(scheduler_pb2.AdmitRequest(
        model=model, prompt_tokens=len(prompt), max_tokens=max_tokens, prefix_hashes=hashes), timeout=60)
    if lease.worker_address not in channels:
        channels[lease.worker_address] = grpc.aio.insecure_channel(lease.worker_address)
    stub = worker_pb2_grpc.WorkerStub(channels[lease.worker_address])
    first = None
    cached = tokens = 0
    async for delta in stub.Generate(worker_pb2.GenerateTokensRequest(
            model=model, lease_id=lease.lease_id, prompt_ids=prompt,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)), timeout=60):
        if first is None and delta.token_ids:
            first = time.perf_counter()
        cached = delta.cached_tokens
        tokens += len(delta.token_ids)
    out["ttft"].append(first - started)
    out["prompt"] += len(prompt)
    out["cached"] += cached
    out["tokens"] += tokens
    out["by_worker"][lease.worker_address] = out["by_worker"].get(lease.worker_address, 0) + 1


async def drive(address: str, model: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    out: dict = {"ttft": [], "prompt": 0, "cached": 0, "tokens": 0, "by_worker": {}}
    channels: dict[str, grpc.aio.Channel] = {}
    async with grpc.aio.insecure_channel(address) as ch:
        sched = scheduler_pb2_grpc.SchedulerStub(ch)
        todo = list(reversed(prompts))
        prefix = await prefix_of(sched, model)

        async def client() -> None:
            while todo:
                prompt = todo.pop()
                await one_request(sched, channels, model, prompt, max_tokens, out, prefix(prompt))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        out["elapsed"] = time.perf_counter() - started
    for c in channels.values():
        await c.close()
    return out


def run_policy(policy: str, prompts: list[list[int]], args: argparse.Namespace, log_dir: Path) -> dict:
    kv = args.kv_prompts * (SYSTEM_TOKENS + USER_TOKENS + args.max_tokens)
    workers = [start_sim_worker(log_dir, args.model_dir, max_num_seqs=args.max_num_seqs, sim_kv_capacity_tokens=kv,
                                sim_ttft_ms=args.ttft_ms, sim_prompt_token_ms=args.prompt_token_ms,
                                sim_itl_ms=args.itl_ms) for _ in range(4)]
    scheduler = start_scheduler(log_dir, [w.address for w in workers], policy=policy)
    try:
        model = list_workers(scheduler.address)[0].model
        out = asyncio.run(drive(scheduler.address, model, prompts, args.concurrency, args.max_tokens))
        reported = [w.load.prefix_cache_hit_rate for w in list_workers(scheduler.address)]
        decisions = routing_decisions(scheduler.metrics_port)  # type: ignore[attr-defined]
    finally:
        scheduler.stop()
        for w in workers:
            w.stop()
    ttft = out["ttft"]
    return {"policy": policy, "requests": len(ttft), "hit_rate": out["cached"] / out["prompt"],
            "worker_reported_hit_rate": statistics.mean(reported),
            "ttft_mean_ms": statistics.mean(ttft) * 1e3, "ttft_p50_ms": percentile(ttft, 0.5) * 1e3,
            "ttft_p99_ms": percentile(ttft, 0.99) * 1e3, "requests_per_s": len(ttft) / out["elapsed"],
            "output_tokens_per_s": out["tokens"] / out["elapsed"],
            "per_worker": sorted(out["by_worker"].values()), "decisions": decisions}


def routing_decisions(metrics_port: int) -> dict[str, int]:
    """The scheduler's routing decisions by outcome (from its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("infermesh_scheduler_routing_decisions_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = int(float(line.rsplit(" ", 1)[1]))
    return out


async def admit_loop(address: str, model: str, total: int, concurrency: int, release: bool) -> dict:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as ch:
        sched = scheduler_pb2_grpc.SchedulerStub(ch)
        prefix = await prefix_of(sched, model)
        request = scheduler_pb2.AdmitRequest(model=model, prompt_tokens=100, max_tokens=16,
                                             prefix_hashes=prefix(list(range(100))))
        await sched.Admit(request)  # connect
        left = [total]

        async def client() -> None:
            while left[0] > 0:
                left[0] -= 1
                t = time.perf_counter()
                lease = await sched.Admit(request, timeout=30)
                latencies.append(time.perf_counter() - t)
                if release:
                    await sched.Release(scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"admissions_per_s": len(latencies) / elapsed, "p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3}


def run_admission(args: argparse.Namespace, log_dir: Path) -> dict:
    # Workers too big to fill, and leases that outlive the run: Admit alone is measured.
    workers = [start_sim_worker(log_dir, args.model_dir, max_num_seqs=1_000_000,
                                sim_kv_capacity_tokens=2_000_000_000) for _ in range(4)]
    scheduler = start_scheduler(log_dir, [w.address for w in workers], lease_ttl=600, max_queue=100_000)
    results = {}
    try:
        model = list_workers(scheduler.address)[0].model
        for concurrency in (1, args.admission_concurrency):
            for release in (False, True):
                key = f"c{concurrency}_{'admit_release' if release else 'admit'}"
                results[key] = asyncio.run(admit_loop(scheduler.address, model, args.admissions, concurrency,
                                                      release))
                print(key, json.dumps(results[key]), flush=True)
    finally:
        scheduler.stop()
        for w in workers:
            w.stop()
    return results


def main() -> None:
    from infermesh.common.model_prep import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=6, help="Concurrent clients (routing).")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--kv-prompts", type=int, default=4, help="KV capacity (and prefix cache) per worker, "
                        "in requests of prompt plus max_tokens.")
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--prompt-token-ms", type=float, default=0.1, help="Prefill cost per uncached token.")
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--admissions", type=int, default=5000)
    parser.add_argument("--admission-concurrency", type=int, default=64)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--skip-admission", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    args.model_dir = default_model_dir()
    log_dir = Path(tempfile.mkdtemp(prefix="scheduler-bench-"))
    prompts = workload(args.requests)
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("model_dir", "json")},
                     "routing": []}
    for policy in args.policies.split(","):
        r = run_policy(policy, prompts, args, log_dir)
        print(json.dumps(r), flush=True)
        results["routing"].append(r)
    if not args.skip_admission:
        results["admission"] = run_admission(args, log_dir)
    print()
    print("| policy | prefix-cache hit rate | (workers' report) | TTFT mean ms | TTFT p99 ms | req/s | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results["routing"]:
        print(f"| {r['policy']} | {r['hit_rate']:.3f} | {r['worker_reported_hit_rate']:.3f} | "
              f"{r['ttft_mean_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['requests_per_s']:.1f} | "
              f"{r['output_tokens_per_s']:.0f} |")
    for key, r in results.get("admission", {}).items():
        print(f"| {key} | {r['admissions_per_s']:.0f}/s | p50 {r['p50_ms']:.2f} ms | p99 {r['p99_ms']:.2f} ms |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
