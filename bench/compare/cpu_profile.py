"""Where the CPU goes: each process's CPU time on both sides during one steady point.

Starts both sides as `run.py` does (or uses running ones: --vllm-pid/--mesh-pid
with --vllm-url/--mesh-url), runs one `vllm bench serve` point on each, and
reports every process's CPU seconds and microseconds per output token (the
load generator included). With --py-spy it also samples the mesh's Python
processes (frontend, worker, scheduler, tokenizer) during the mesh's run and
writes py-spy's collapsed stacks next to the results.

    python -m bench.compare.cpu_profile [--concurrency 16] [--prompts 64] [--py-spy]
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.compare import servers
from bench.compare.run import bench_argv, engine_args, mesh_env, parse_args, run_jobs


def label(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "gone"
    text = " ".join(cmd)
    if "infermesh.cli" in text:
        i = cmd.index("infermesh.cli") if "infermesh.cli" in cmd else -1
        return "mesh " + (cmd[i + 1] if i >= 0 and i + 1 < len(cmd) else "?")
    if "envoy" in text.split(" ")[0]:
        return "envoy"
    if "api_server" in text:
        return "vLLM api_server"
    try:
        return proc.name()
    except psutil.Error:
        return "gone"


def cpu_by_process(root_pid: int) -> dict[int, tuple[str, float]]:
    root = psutil.Process(root_pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (label(p), t.user + t.system)
        except psutil.Error:
            pass
    return out


def delta(before: dict, after: dict) -> dict[str, float]:
    totals: dict[str, float] = collections.defaultdict(float)
    for pid, (name, cpu) in after.items():
        totals[name] += cpu - before.get(pid, (name, 0.0))[1]
    return dict(totals)


def pin_off_model_cores(root_pid: int) -> dict[str, str]:
    """Moves every thread of the tree except vLLM's model worker off the model worker's cores."""
    import os

    procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    model = [p for p in procs if "VLLM::Worker" in " ".join(p.cmdline()) or p.name().startswith("VLLM::Worker")]
    model_cores = set().union(*(os.sched_getaffinity(p.pid) for p in model)) if model else set()
    free = set(range(os.cpu_count() or 1)) - model_cores
    if not free:
        return {"skipped": "no free core"}
    done = {}
    for p in procs:
        if p in model:
            continue
        for t in Path(f"/proc/{p.pid}/task").iterdir():
            try:
                os.sched_setaffinity(int(t.name), free)
            except OSError:
                pass
        done[label(p)] = ",".join(map(str, sorted(free)))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--py-spy", action="store_true")
    p.add_argument("--pin-mesh", action="store_true",
                   help="then run the mesh once more with all its processes but vLLM's model worker pinned to "
                   "the cores vLLM leaves free (an experiment: vLLM pins only its model worker)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "infermesh-cpu-profile")
    a = p.parse_args(argv)
    args = parse_args([])
    from infermesh.common.model_prep import default_model_dir

    model_dir = default_model_dir()
    name = model_dir.name
    a.out.mkdir(parents=True, exist_ok=True)
    env, vllm_extra, mesh_extra = engine_args(args)
    sides = {"vllm": servers.vllm_server(model_dir, name, a.out, env=env, extra=vllm_extra),
             "mesh": servers.mesh(model_dir, a.out, env=mesh_env(args), extra=mesh_extra)}
    report = {}
    try:
        for s in sides.values():
            s.start()
        for s in sides.values():
            print(f"{s.name} ready after {s.wait_ready(1800):.0f} s", flush=True)
        kw = {"dataset_name": "random", "random_input_len": 128, "random_output_len": 64,
              "num_prompts": a.prompts, "max_concurrency": a.concurrency}
        for side, s in sides.items():  # warm-up
            run_jobs([{"argv": bench_argv(args, s.url, model_dir, name, **kw, seed=1),
                       "out": str(a.out / f"warm-{side}.json")}], a.out)
        order = list(sides.items())
        if a.pin_mesh:
            order += [("mesh-pinned", sides["mesh"]), ("vllm-again", sides["vllm"])]
        for side, s in order:
            if side == "mesh-pinned":
                print("pinned:", pin_off_model_cores(s.pid), flush=True)
            spies = []
            if a.py_spy and side == "mesh":
                for proc in psutil.Process(s.pid).children(recursive=True):
                    what = label(proc)
                    if what.startswith("mesh ") and what != "mesh up":
                        out = a.out / f"py-spy-{what.split()[1]}-{proc.pid}.txt"
                        spies.append(subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--rate", "50",
                                                       "--nonblocking", "--format", "raw", "--output", str(out),
                                                       "--duration", "25"], stdout=subprocess.DEVNULL,
                                                      stderr=subprocess.DEVNULL))
            before = cpu_by_process(s.pid)
            started = time.perf_counter()
            job = {"argv": bench_argv(args, s.url, model_dir, name, **kw, seed=2), "out": str(a.out / f"{side}.json")}
            spec = a.out / f"jobs-{side}.json"
            spec.write_text(json.dumps([job]))
            bench = subprocess.Popen([sys.executable, "-m", "bench.compare.vllm_client", str(spec)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            peak: dict[int, float] = {}
            while bench.poll() is None:  # the load generator's own CPU, sampled while it lives
                try:
                    t = psutil.Process(bench.pid).cpu_times()
                    peak[bench.pid] = t.user + t.system
                except psutil.Error:
                    pass
                time.sleep(0.2)
            elapsed = time.perf_counter() - started
            after = cpu_by_process(s.pid)
            result = json.loads(Path(job["out"]).read_text())
            tokens = result["total_output_tokens"]
            cpu = delta(before, after)
            cpu["load generator (vllm bench, incl. import)"] = sum(peak.values())
            report[side] = {"tokens": tokens, "seconds": round(elapsed, 1),
                            "output_throughput": round(result["output_throughput"], 1),
                            "cpu_s": {k: round(v, 2) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])},
                            "cpu_us_per_token": {k: round(v / tokens * 1e6) for k, v in cpu.items()}}
            for spy in spies:
                spy.wait(60)
            print(json.dumps({side: report[side]}, indent=1), flush=True)
    finally:
        for s in sides.values():
            s.stop()
    (a.out / "cpu-profile.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
