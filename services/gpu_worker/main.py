"""`infermesh worker`: one engine serving one model over gRPC.

Defaults, and why (measured for the best throughput on a small CPU machine; a
GPU host gets vLLM's own GPU defaults where ours say "auto"):

- `--engine vllm` always; `sim` only when asked (its output is not a model's).
- `--model`: the prepared default model; the model's name is its directory's
  name (the tokenizer service names it the same way), or NAME=DIR.
- `--max-num-seqs 0` (auto): 64 on CPUs, where two cores already reach their
  ~200-230 tokens/s at 16-32 streams and 64 leaves headroom for bursts while
  bounding inter-token latency; vLLM's 256 on GPUs; 256 for the simulated engine.
- `--kv-cache-gb 0` (auto): 4 GiB on CPUs (VLLM_CPU_KVCACHE_SPACE), which holds
  ~186k tokens of the default model; on GPUs vLLM's memory utilization (0.9).
  A value sets the KV cache size exactly.
- `--enforce-eager` off: compiled graphs run faster but start slower (minutes
  on CPUs); tests turn it on to start in under a minute.
- `--engine-stats` off: load reports come from the worker's own accounting;
  vLLM's per-step statistics cost its engine process about a fifth of a core
  here (see vllm_engine.py).
- `--dtype auto` (the model's own, bf16 for the default model),
  `--tensor-parallel-size 1`, `--max-model-len 0` (the model's context window).
- `--cpus auto`: on a machine without an accelerator, once the engine has
  started, the worker's own threads (gRPC, the engine client) and the engine's
  scheduling process move to the cores vLLM did not bind the model's compute
  threads to, so serving work does not preempt the model (measured with the
  worker benchmark: 0.90x -> 0.96x of in-process AsyncLLM at concurrency 1 on
  2 cores). `--engine-cpus` chooses the model's cores (VLLM_CPU_OMP_THREADS_BIND;
  default vLLM's own: all cores but one). `infermesh up` sets both per worker.
  An embed worker is not pinned by `auto`: a pooling model's step is short, so
  its scheduling process and the mesh's own per-request work, crowded onto the
  cores left over, were the bottleneck (single-sentence requests at
  concurrency 16 on 2 cores: 55 embeddings/s pinned, 72 unpinned; see
  docs/benchmarks/embeddings.md).
- The simulated engine: 50 ms to the first token plus 0.02 ms per uncached
  prompt token, 20 ms between tokens, 1M KV tokens, blocks of 16.
- `--task generate`; `--task embed` serves embeddings (vLLM's pooling runner),
  in float32 unless `--dtype` says otherwise: all-MiniLM-L6-v2's vectors match
  sentence-transformers' to cosine 1.000000 in fp32, 0.99994 in bf16. The
  simulated engine embeds too: 20 ms per batch (plus the per-token cost),
  vectors of the model's hidden size (`--sim-embed-dim`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from infermesh.common.config import ServiceConfig, option
from infermesh.common.model_prep import parse_model_spec
from infermesh.common.runner import run_service
from infermesh.common.server import GrpcServer
from infermesh.gpu_worker.engine import Engine

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkerConfig(ServiceConfig):
    port: int = option(50060, "gRPC port.")
    metrics_port: int = option(9110, "Port of the Prometheus /metrics endpoint (0: none).")
    engine: str = option("vllm", "The engine: vllm, or sim (simulated, for tests at scale).",
                         choices=("vllm", "sim"))
    task: str = option("generate", "What the model does: generate (chat, completions) or embed (embeddings).",
                       choices=("generate", "embed"))
    model: str = option("", "Model directory, or NAME=DIR (default: the prepared default model).")
    worker_id: str = option("", "This worker's id in load reports (default: host:port).")
    max_model_len: int = option(0, "Context window cap (0: the model's own).")
    max_num_seqs: int = option(0, "Most sequences at once (0: 64 on CPUs, 256 on GPUs and for sim).")
    kv_cache_gb: float = option(0.0, "KV cache size in GiB (0: 4 on CPUs, vLLM's GPU memory utilization on GPUs).")
    enforce_eager: bool = option(False, "Run eagerly (no compiled graphs): faster start, slower steps.")
    dtype: str = option("auto", "Weights' dtype (auto: the model's own; float32 for --task embed).")
    tensor_parallel_size: int = option(1, "GPUs per worker (tensor parallelism).")
    block_size: int = option(0, "KV block size in tokens (0: the engine's default; 16 for sim).")
    engine_stats: bool = option(False, "vllm: read load from vLLM's per-step scheduler statistics (exact, "
                                "but costs engine CPU) instead of the worker's own accounting.")
    cpus: str = option("auto", "Cores of the worker's own threads and the engine's scheduling process: auto (on "
                       "CPU engines, the cores the model's threads do not use; no pinning for --task embed), all "
                       "(no pinning), or a list like 1,3-4.")
    engine_cpus: str = option("", "vllm on CPUs: cores of the model's compute threads, like 0 or 0-2 (groups per "
                              "tensor-parallel rank separated by |; default vLLM's choice).")
    sim_ttft_ms: float = option(50.0, "sim: time to first token in ms (plus the per-prompt-token cost).")
    sim_prompt_token_ms: float = option(0.02, "sim: prefill cost per uncached prompt token in ms.")
    sim_itl_ms: float = option(20.0, "sim: inter-token latency in ms.")
    sim_kv_capacity_tokens: int = option(1_048_576, "sim: KV cache capacity in tokens.")
    sim_fail_after_tokens: int = option(0, "sim: the engine dies after this many tokens (failure tests; 0: never).")
    sim_fail_rate: float = option(0.0, "sim: the share of requests that fail before their first token (a bad "
                                  "model version, for canary tests; the engine lives on).")
    sim_start_ms: float = option(0.0, "sim: how long the engine takes to start; until then, as vLLM's, it reports no "
                                 "window, capacity or block size.")
    sim_embed_dim: int = option(0, "sim, --task embed: the vectors' length (0: the model's hidden size).")
    sim_embed_ms: float = option(20.0, "sim, --task embed: the time of one batch in ms (plus the per-token cost).")

    def validate(self) -> list[str]:
        problems = super().validate()
        for name in ("max_model_len", "max_num_seqs", "block_size", "sim_kv_capacity_tokens",
                     "sim_fail_after_tokens", "sim_embed_dim"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        for name in ("kv_cache_gb", "sim_ttft_ms", "sim_prompt_token_ms", "sim_itl_ms", "sim_start_ms",
                     "sim_embed_ms"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if not 0 <= self.sim_fail_rate <= 1:
            problems.append(f"sim_fail_rate must be within 0..1, got {self.sim_fail_rate}")
        problems.extend(cpu_problems(self.cpus, self.engine_cpus))
        if self.tensor_parallel_size < 1:
            problems.append("tensor_parallel_size must be >= 1")
        if self.model:
            _, path = parse_model_spec(self.model)
            if self.engine == "vllm" and not (path / "config.json").is_file():
                problems.append(f"model {self.model!r}: {path} is not a model directory (no config.json)")
        return problems


def cpu_problems(cpus_option: str, engine_cpus: str) -> list[str]:
    from infermesh.common import cpus

    problems = []
    lists = [] if cpus_option in ("auto", "all") else [("cpus", cpus_option)]
    lists += [("engine_cpus", part) for part in engine_cpus.split("|")] if engine_cpus else []
    for name, text in lists:
        try:
            problem = cpus.check(cpus.parse(text))
        except cpus.CpuListError as exc:
            problem = str(exc)
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def place_threads(config: WorkerConfig) -> None:
    """Keeps the worker's threads off the model's cores (see --cpus)."""
    from infermesh.common import cpus

    if config.cpus == "all" or (config.cpus == "auto" and (config.engine != "vllm" or config.task == "embed")):
        return
    placed = cpus.pin_tree(None if config.cpus == "auto" else cpus.parse(config.cpus))
    if placed is None:
        logger.info("CPU placement: none (the engine bound no cores, or none is left over)")
        return
    logger.info("CPU placement: model on cores %s; the worker and the engine's other processes on %s",
                cpus.to_text(placed.model) or "-", cpus.to_text(placed.serving))


def model_spec(config: WorkerConfig) -> tuple[str, Path]:
    if config.model:
        return parse_model_spec(config.model)
    from infermesh.common.model_prep import default_model_dir, is_complete

    default = default_model_dir()
    if not is_complete(default):
        raise SystemExit(f"infermesh worker: the default model is not prepared ({default}); "
                         "run `infermesh prepare-model` or pass --model DIR")
    return default.name, default


def build_engine(config: WorkerConfig) -> Engine:
    name, path = model_spec(config)
    if config.engine == "sim":
        from infermesh.gpu_worker.sim_engine import SimEngine, SimOptions

        options = SimOptions(ttft_ms=config.sim_ttft_ms, prompt_token_ms=config.sim_prompt_token_ms,
                             itl_ms=config.sim_itl_ms, max_num_seqs=config.max_num_seqs or 256,
                             kv_capacity_tokens=config.sim_kv_capacity_tokens,
                             block_size=config.block_size or 16, max_model_len=config.max_model_len,
                             fail_after_tokens=config.sim_fail_after_tokens,
                             fail_rate=config.sim_fail_rate, start_ms=config.sim_start_ms,
                             task=config.task, embed_dim=config.sim_embed_dim, embed_ms=config.sim_embed_ms)
        return SimEngine(name, path if path.is_dir() else None, options)
    from infermesh.gpu_worker.vllm_engine import VllmEngine, VllmOptions

    dtype = "float32" if config.task == "embed" and config.dtype == "auto" else config.dtype
    return VllmEngine(name, path, VllmOptions(
        max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs, kv_cache_gb=config.kv_cache_gb,
        enforce_eager=config.enforce_eager, dtype=dtype,
        tensor_parallel_size=config.tensor_parallel_size, block_size=config.block_size,
        engine_stats=config.engine_stats, task=config.task))


async def serve(config: WorkerConfig) -> int:
    from infermesh.gpu_worker.service import WorkerService
    from infermesh.v1 import worker_pb2, worker_pb2_grpc

    if config.engine_cpus:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = config.engine_cpus
    engine = build_engine(config)
    worker_id = config.worker_id or f"{socket.gethostname()}:{config.port}"
    service = WorkerService(engine, worker_id)
    full_name = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
    server = GrpcServer("worker", config, [(worker_pb2_grpc.add_WorkerServicer_to_server, service, full_name)],
                        on_drain=service.drain)
    failed = False

    async def watch_engine() -> None:
        nonlocal failed
        while engine.healthy():
            await asyncio.sleep(0.5)
        failed = True
        logger.error("the engine has failed; the worker stops")
        await server.set_serving(False)
        server.request_stop()

    async def ready() -> None:
        await engine.start()
        place_threads(config)
        service.engine_started()
        asyncio.create_task(watch_engine())
        info = engine.info
        logger.info("engine %s ready: model %s (%s), context %d, %d seqs, %d KV tokens", info.engine, info.model,
                    info.task, info.max_model_len, info.max_num_seqs, info.kv_capacity_tokens)

    try:
        await server.serve(ready=ready)
    finally:
        await engine.shutdown()
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    from infermesh.gpu_worker.catalog_model import expand

    argv = expand(list(sys.argv[1:] if argv is None else argv))  # --catalog FILE --model NAME
    return run_service("worker", WorkerConfig, argv,
                       "A GPU worker: one engine (vLLM or simulated) streaming tokens over gRPC.", serve)
