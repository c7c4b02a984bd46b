"""infermesh vs vLLM's own OpenAI server, with vLLM's own load generator.

Starts (once per run) vLLM's OpenAI server (`python -m
vllm.entrypoints.openai.api_server`, its default settings except the KV
cache size, which its CPU default makes 92 % of the machine's memory) and the
mesh (`infermesh up --ports-from BASE`, clients through Envoy) on the same
model, then alternates the sides:

1. steady: random data, 128 in / 64 out, concurrency 1, 4, 16 (`vllm bench serve`);
2. overload: 3x the sustainable rate for 60 s, goodput within a 2 s TTFT SLO
   and how fast refusals come (bench/compare/overload.py);
3. prefix: vLLM's `prefix_repetition` data on 2 workers, against one vLLM
   server per worker behind a round-robin proxy.

Writes docs/benchmarks/vs-vllm.{json,md} and PNG plots.

    python -m bench [--scenarios steady overload prefix] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from infermesh.common import cpus

from bench.compare import overload, plots, report, results, servers

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPTS = {1: 16, 4: 32, 16: 64}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infermesh bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", default=["steady", "overload", "prefix"],
                   choices=["steady", "overload", "prefix"])
    p.add_argument("--quick", action="store_true", help="a small smoke run: concurrency 1 and 4, 8 prompts, "
                   "1 round, 15 s of overload, 16 prefix prompts")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompts", type=int, default=0, help="prompts per steady point and round "
                   "(0: 16, 32, 64 for concurrency 1, 4, 16; 4x the concurrency otherwise)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--overload-seconds", type=float, default=60.0)
    p.add_argument("--overload-factor", type=float, default=3.0)
    p.add_argument("--overload-rate", type=float, default=0.0,
                   help="requests/s one worker sustains (0: measure vLLM's request throughput at "
                   "--sustain-concurrency first)")
    p.add_argument("--sustain-concurrency", type=int, default=64,
                   help="concurrency of the saturation measurement (the mesh worker's max_num_seqs)")
    p.add_argument("--sustain-prompts", type=int, default=128)
    p.add_argument("--slo", type=float, default=results.SLO_TTFT_S, help="TTFT SLO in seconds")
    p.add_argument("--drain", type=float, default=30.0, help="seconds in-flight requests get after the window")
    p.add_argument("--mesh-max-queue", type=int, default=None,
                   help="the mesh scheduler's admission queue (INFERMESH_MAX_QUEUE; default: the scheduler's)")
    p.add_argument("--mesh-queue-timeout", type=float, default=None,
                   help="the mesh scheduler's queue timeout in s (INFERMESH_QUEUE_TIMEOUT; default: the scheduler's)")
    p.add_argument("--mesh-keepalive", type=float, default=None,
                   help="seconds between the frontend's SSE keep-alive comments, and its first-event wait "
                   "(INFERMESH_KEEPALIVE, INFERMESH_FIRST_EVENT_WAIT; default: the frontend's; see mesh_env)")
    p.add_argument("--prefix-prompts", type=int, default=64)
    p.add_argument("--prefix-concurrency", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--prefix-output-len", type=int, default=32)
    p.add_argument("--kv-cache-gb", type=int, default=4, help="KV cache of every engine (both sides)")
    p.add_argument("--prefix-kv-cache-gb", type=int, default=1,
                   help="KV cache of each of the 4 engines of the prefix scenario (memory: 4 engines at once)")
    p.add_argument("--enforce-eager", action="store_true", help="both sides eager (faster start, slower steps)")
    p.add_argument("--vllm-url", default="", help="use this running vLLM server (steady, overload)")
    p.add_argument("--mesh-url", default="", help="use this running mesh (steady, overload)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "benchmarks")
    p.add_argument("--name", default="vs-vllm")
    p.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "infermesh-vs-vllm")
    if p.parse_known_args(argv)[0].quick:  # smaller defaults; options given still win
        p.set_defaults(concurrency=[1, 4], prompts=8, rounds=1, overload_seconds=15.0, prefix_prompts=16,
                       drain=15.0, sustain_prompts=64)
    return p.parse_args(argv)


def bench_argv(args: argparse.Namespace, url: str, model_dir: Path, name: str, **kw: Any) -> list[str]:
    argv = ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", str(model_dir),
            "--served-model-name", name, "--temperature", "0", "--disable-tqdm", "--ignore-eos", "--save-detailed",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--ready-check-timeout-sec", "60"]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def run_jobs(jobs: list[dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    """Runs `vllm bench serve` jobs in one client process (imported once), in the given order."""
    spec = work / f"jobs-{time.time_ns()}.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(work / "vllm-bench-client.log", "ab") as log:
        subprocess.run([sys.executable, "-m", "bench.compare.vllm_client", str(spec)], cwd=ROOT, env=env,
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    return [json.loads(Path(j["out"]).read_text()) for j in jobs]


def engine_args(args: argparse.Namespace, kv_gb: int = 0) -> tuple[dict[str, str], list[str], list[str]]:
    """Environment and flags that give both sides the same engine settings."""
    kv_gb = kv_gb or args.kv_cache_gb
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_gb)}
    eager = ["--enforce-eager"] if args.enforce_eager else []
    return env, eager, ["--kv-cache-gb", str(kv_gb), *eager]


def steady(args, model_dir: Path, name: str, urls: dict[str, str], work: Path) -> dict[str, Any]:
    jobs, keys = [], []
    warm = {"dataset_name": "random", "random_input_len": 128, "random_output_len": 64, "num_prompts": 16,
            "max_concurrency": 16, "seed": 1000}
    for side in ("vllm", "mesh"):  # warm-up (compiled graphs for new batch sizes, connections), discarded
        jobs.append({"argv": bench_argv(args, urls[side], model_dir, name, **warm),
                     "out": str(work / f"warm-{side}.json")})
        keys.append(None)
    for r in range(args.rounds):
        for i, c in enumerate(args.concurrency):
            order = ("vllm", "mesh") if (r + i) % 2 == 0 else ("mesh", "vllm")
            n = args.prompts or DEFAULT_PROMPTS.get(c, 4 * c)
            for side in order:
                kw = {"dataset_name": "random", "random_input_len": 128, "random_output_len": 64, "num_prompts": n,
                      "max_concurrency": c, "seed": r * 100 + i}
                jobs.append({"argv": bench_argv(args, urls[side], model_dir, name, **kw),
                             "out": str(work / f"steady-r{r}-c{c}-{side}.json")})
                keys.append((c, side))
    raw = run_jobs(jobs, work)
    rounds: dict[int, dict[str, list]] = {c: {"vllm": [], "mesh": []} for c in args.concurrency}
    samples: dict[int, dict[str, dict[str, list[float]]]] = {
        c: {s: {"ttft": [], "itl": []} for s in ("vllm", "mesh")} for c in args.concurrency}
    for key, result in zip(keys, raw, strict=True):
        if key is None:
            continue
        c, side = key
        rounds[c][side].append(results.summarize_vllm_bench(result))
        ok = [not e for e in result["errors"]]
        samples[c][side]["ttft"] += [t * 1000 for t, g in zip(result["ttfts"], ok, strict=True) if g]
        samples[c][side]["itl"] += [x * 1000 for chunks, g in zip(result["itls"], ok, strict=True) if g for x in chunks]
    points = []
    for c in args.concurrency:
        point = results.steady_point(c, rounds[c]["vllm"], rounds[c]["mesh"])
        point["targets"] = results.steady_targets(point)
        points.append(point)
    per_round = {c: {s: [x["output_throughput"] for x in rounds[c][s]] for s in ("vllm", "mesh")}
                 for c in args.concurrency}
    out = args.out_dir
    plots.throughput(points, per_round, out / f"{args.name}-throughput.png")
    plots.distributions(samples, "ttft", "Time to first token (steady load)", out / f"{args.name}-ttft.png")
    plots.distributions(samples, "itl", "Inter-token latency (steady load)", out / f"{args.name}-itl.png")
    return {"rounds": args.rounds, "prompts": {c: args.prompts or DEFAULT_PROMPTS.get(c, 4 * c)
                                                for c in args.concurrency},
            "points": points, "per_round_throughput": per_round,
            "per_round": {c: rounds[c] for c in args.concurrency}}


def sustainable_rate(args, model_dir: Path, name: str, urls: dict[str, str], work: Path,
                     doc: dict[str, Any]) -> tuple[float, str]:
    if args.overload_rate:
        return args.overload_rate, "given by --overload-rate"
    c, n = args.sustain_concurrency, args.sustain_prompts
    kw = {"dataset_name": "random", "random_input_len": 128, "random_output_len": 64, "num_prompts": n,
          "max_concurrency": c, "seed": 999}
    result = run_jobs([{"argv": bench_argv(args, urls["vllm"], model_dir, name, **kw),
                        "out": str(work / "sustainable.json")}], work)[0]
    doc["sustainable_measurement"] = results.summarize_vllm_bench(result)
    return result["request_throughput"], (f"vLLM server's request throughput at concurrency {c}, {n} prompts, "
                                          "measured just before")


def overload_scenario(args, model_dir: Path, name: str, urls: dict[str, str], work: Path,
                      doc: dict[str, Any]) -> dict[str, Any]:
    sustainable, source = sustainable_rate(args, model_dir, name, urls, work, doc)
    rate = args.overload_factor * sustainable
    prompts = overload.random_prompts(model_dir, 512, 128, seed=7)
    runs: dict[str, list[dict[str, Any]]] = {}
    order = ["vllm", "mesh"]
    for side in order:
        outcomes = asyncio.run(overload.run(urls[side], name, prompts, rate, args.overload_seconds, 64,
                                            args.drain, seed=11))
        runs[side] = overload.to_json(outcomes)
        (work / f"overload-{side}.json").write_text(json.dumps(runs[side]))
        time.sleep(5)  # let the side settle (aborted requests freed) before the next one
    summary = {side: results.overload_summary(runs[side], args.overload_seconds, args.slo, rate) for side in order}
    plots.overload_timeline(runs, args.slo, args.out_dir / f"{args.name}-overload.png")
    return {"rate": rate, "seconds": args.overload_seconds, "factor": args.overload_factor,
            "sustainable_rps": sustainable, "sustainable_from": source, "slo_s": args.slo, "drain_s": args.drain,
            "order": order, "mesh_admission": mesh_admission(args), **summary,
            "targets": results.overload_targets(summary["vllm"], summary["mesh"], args.slo)}


def prefix_scenario(args, model_dir: Path, name: str, work: Path) -> dict[str, Any]:
    env, vllm_extra, mesh_extra = engine_args(args, args.prefix_kv_cache_gb)
    # `infermesh up --workers 2` gives each worker's model its own cores (infermesh.common.cpus.plan);
    # vLLM's servers get the same cores, or both would bind their model to vLLM's default (core 0 here).
    cores = cpus.plan(2, cpus.allowed()).workers
    vllms = [servers.vllm_server(model_dir, name, work, tag=f"vllm-{i}",
                                 env={**env, "VLLM_CPU_OMP_THREADS_BIND": cpus.to_text(cores[i])}, extra=vllm_extra)
             for i in range(2)]
    mesh = servers.mesh(model_dir, work, workers=2, env=mesh_env(args), extra=mesh_extra)
    proxy = None
    try:
        for s in [*vllms, mesh]:
            s.start()
        for s in [*vllms, mesh]:
            print(f"  {s.name} ready after {s.wait_ready(1800):.0f} s", flush=True)
        proxy = servers.run_proxy_process([v.url.removeprefix("http://") for v in vllms])
        urls = {"vllm": proxy.url, "mesh": mesh.url}  # type: ignore[attr-defined]
        dataset = {"dataset_name": "prefix_repetition", "prefix_repetition_prefix_len": args.prefix_len,
                   "prefix_repetition_suffix_len": args.suffix_len,
                   "prefix_repetition_num_prefixes": args.num_prefixes,
                   "prefix_repetition_output_len": args.prefix_output_len}
        jobs, keys = [], []
        for r in range(args.rounds):
            for side in (("vllm", "mesh") if r % 2 == 0 else ("mesh", "vllm")):
                kw = {**dataset, "num_prompts": args.prefix_prompts, "max_concurrency": args.prefix_concurrency,
                      "seed": 500 + r}
                jobs.append({"argv": bench_argv(args, urls[side], model_dir, name, **kw),
                             "out": str(work / f"prefix-r{r}-{side}.json")})
                keys.append(side)
        raw = run_jobs(jobs, work)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for s in [mesh, *vllms]:
            s.stop()
    rounds: dict[str, list] = {"vllm": [], "mesh": []}
    for side, result in zip(keys, raw, strict=True):
        rounds[side].append(results.summarize_vllm_bench(result))
    point = results.steady_point(args.prefix_concurrency, rounds["vllm"], rounds["mesh"])
    return {"dataset": f"prefix {args.prefix_len} tokens x {args.num_prefixes} prefixes, suffix "
                       f"{args.suffix_len}, {args.prefix_output_len} out, {args.prefix_prompts} prompts",
            "concurrency": args.prefix_concurrency, "rounds": args.rounds, "point": point, "per_round": rounds,
            "vllm_side": "two vLLM servers behind a connection-level round-robin TCP proxy "
                         "(bench/compare/servers.py), their models on cores "
                         + " and ".join(cpus.to_text(c) for c in cores) + " (VLLM_CPU_OMP_THREADS_BIND)",
            "mesh_side": "`infermesh up --workers 2` (prefix-affinity routing, the scheduler's default; "
                         "its CPU placement puts the workers' models on the same cores)",
            "engines": f"every engine: {' '.join(mesh_extra)} (VLLM_CPU_KVCACHE_SPACE={env['VLLM_CPU_KVCACHE_SPACE']})"}


def mesh_env(args) -> dict[str, str]:
    """The mesh's settings for this run: the scheduler admits for the scenario's TTFT SLO (--ttft-slo).

    Queue bound and timeout stay the scheduler's defaults unless given. The frontend keeps its own
    keep-alive unless --mesh-keepalive is given: vLLM's load generator fails a stream in which an SSE
    comment arrives on its own, and the frontend sends one only when a stream went --keepalive
    seconds (after --first-event-wait, for the first token) without a token.
    """
    env = {"INFERMESH_TTFT_SLO": str(args.slo)}
    if args.mesh_max_queue is not None:
        env["INFERMESH_MAX_QUEUE"] = str(args.mesh_max_queue)
    if args.mesh_queue_timeout is not None:
        env["INFERMESH_QUEUE_TIMEOUT"] = str(args.mesh_queue_timeout)
    if args.mesh_keepalive is not None:
        env["INFERMESH_KEEPALIVE"] = env["INFERMESH_FIRST_EVENT_WAIT"] = str(args.mesh_keepalive)
    return env


def mesh_admission(args) -> str:
    """The admission settings the mesh ran with, in words for the report."""
    from infermesh.scheduler.dispatcher import Limits

    defaults = Limits()
    max_queue = defaults.max_queue if args.mesh_max_queue is None else args.mesh_max_queue
    timeout = defaults.queue_timeout if args.mesh_queue_timeout is None else args.mesh_queue_timeout
    limits = Limits(max_queue, timeout, ttft_slo=args.slo)
    origin = {True: "the scheduler's default", False: "given"}
    text = (f"scheduler --ttft-slo {args.slo:g} (INFERMESH_TTFT_SLO): a request waits at most {limits.budget():g} s "
            f"for admission ({limits.slo_queue_share:g} of the SLO, at most the queue timeout), and one whose "
            f"expected wait is longer is refused at once; --max-queue {max_queue} "
            f"({origin[args.mesh_max_queue is None]}), --queue-timeout {timeout:g} s "
            f"({origin[args.mesh_queue_timeout is None]}); workers' own capacity check at max_num_seqs")
    if args.mesh_keepalive is not None:
        text += (f"; frontend SSE keep-alive every {args.mesh_keepalive:g} s and first-event wait as long "
                 "(INFERMESH_KEEPALIVE, INFERMESH_FIRST_EVENT_WAIT)")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from infermesh.common.model_prep import default_model_dir, is_complete

    model_dir = default_model_dir()
    if not is_complete(model_dir):
        print("the default model is not prepared: run `infermesh prepare-model` (or `make model`)", file=sys.stderr)
        return 2
    name = model_dir.name
    work = args.log_dir / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env, vllm_extra, mesh_extra = engine_args(args)
    doc: dict[str, Any] = {
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": os.environ.get("INFERMESH_BENCH_COMMIT") or report.git_commit(ROOT),
        "machine": report.machine(), "load_before": report.load_average(),
        "sides": {"vllm": "vLLM's OpenAI server, `python -m vllm.entrypoints.openai.api_server --model DIR "
                          f"--served-model-name {name}` with its defaults and VLLM_CPU_KVCACHE_SPACE="
                          f"{args.kv_cache_gb}" + (" --enforce-eager" if args.enforce_eager else ""),
                  "mesh": f"`{' '.join(f'{k}={v}' for k, v in mesh_env(args).items())} infermesh up --ports-from "
                          f"BASE --model DIR {' '.join(mesh_extra)}` (1 worker, 1 frontend, vLLM engine), requests "
                          "through Envoy"}}
    print(f"logs and raw results: {work}", flush=True)
    owned: list[servers.Server] = []
    try:
        if {"steady", "overload"} & set(args.scenarios):
            urls = {"vllm": args.vllm_url, "mesh": args.mesh_url}
            if not args.vllm_url:
                owned.append(servers.vllm_server(model_dir, name, work, env=env, extra=vllm_extra).start())
                urls["vllm"] = owned[-1].url
            if not args.mesh_url:
                owned.append(servers.mesh(model_dir, work, env=mesh_env(args), extra=mesh_extra).start())
                urls["mesh"] = owned[-1].url
            for s in owned:
                print(f"  {s.name} ready after {s.wait_ready(1800):.0f} s", flush=True)
            if "steady" in args.scenarios:
                print("scenario 1: steady load", flush=True)
                doc["steady"] = steady(args, model_dir, name, urls, work)
            if "overload" in args.scenarios:
                print("scenario 2: overload", flush=True)
                doc["overload"] = overload_scenario(args, model_dir, name, urls, work, doc)
            for s in owned:
                s.stop()
            owned.clear()
        if "prefix" in args.scenarios:
            print("scenario 3: shared prefixes on 2 workers", flush=True)
            doc["prefix"] = prefix_scenario(args, model_dir, name, work)
    finally:
        for s in owned:
            s.stop()
        doc["load_after"] = report.load_average()
        doc["run_minutes"] = round((time.monotonic() - started) / 60, 1)
        if {"steady", "overload", "prefix"} & set(doc):
            report.write(doc, args.out_dir, args.name)
            print(f"wrote {args.out_dir / (args.name + '.md')}", flush=True)
    return 0
