"""How fast the scheduler rolls back a bad canary, and how much the bad version served meanwhile.

For each scenario, a fresh mesh of processes on loopback: one simulated worker
per version of the model `chat` (v1 stable, v2 the canary taking
`--canary-traffic` percent), a scheduler with the catalog, a state file and its
metrics, and a frontend; one tokenizer loading both versions serves every
scenario. A load of streamed chat requests from sticky sessions (`x-session-id`,
chosen so that exactly the canary's share of the requests falls on v2) runs at
`--rate` requests/s, or from `--concurrency` closed-loop clients, while the
scheduler's metrics are polled every 50 ms.

- `fail`: v2 fails `--fail-rate` of its requests before the first token;
- `slow`: v2's first token takes `--slow-factor` times v1's;
- `healthy`, the control: v2 as v1; it must not be rolled back within `--seconds`.

Per scenario: the time from the canary's first request to its rollback, and
from the moment the rule was first met to the rollback (by the scheduler's own
counters: the request counts exact, the p95s estimated from its latency
histograms' buckets, as a PromQL `histogram_quantile` would); the requests
the bad version served (the scheduler's counters), of which failed; the
requests the clients saw fail (the canary's failures are retried on v1: none
should); the load's throughput and TTFT per version before and after the
rollback; and the reason. The references: `min_requests`, the fewest the rule
can judge on (so the bad version's requests are reported as an overshoot over
it), and the time the load needs to send the canary that many requests at its
traffic share.

    python -m bench canary [--scenarios fail slow healthy] [--rate 40 | --concurrency 8] [--canary-traffic 20]
                           [--min-requests 100] [--window-s 60] [--seconds 40] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from infermesh.common.catalog import Rollback, load_catalog
from infermesh.common.model_prep import prepare_default_model
from infermesh.common.versions import SESSION_HEADER, VERSION_HEADER, bucket, split, sticky_key
from infermesh.scheduler.versions import Stats, p95

from tests.fixtures.mesh import FrontendProcess, start_frontend, start_scheduler
from tests.fixtures.worker import start_sim_worker
from tests.harness import ServiceProcess, free_port

MODEL, STABLE, CANARY = "chat", "v1", "v2"
POLL_S = 0.05  # the scheduler's metrics, 20 times a second
SCENARIOS = ("fail", "slow", "healthy")
_SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def catalog_text(model_dir: Path, traffic: float, min_requests: int, window_s: float) -> str:
    version = "      - {{name: {name}, weights: {{dir: {dir}}}, workers: 0{extra}}}\n"
    return (f"format: 1\nmodels:\n  - name: {MODEL}\n    stable: {STABLE}\n    versions:\n"
            + version.format(name=STABLE, dir=model_dir, extra="")
            + version.format(name=CANARY, dir=model_dir, extra=f", traffic: {traffic:g}")
            + f"    rollback: {{window_s: {window_s:g}, min_requests: {min_requests}}}\n")


def session_ids(traffic: float, count: int) -> list[str]:
    """`count` sessions in the order the load cycles through them: exactly `traffic` percent (rounded) of them
    fall on the canary under the frontends' split, spread evenly."""
    want = round(count * traffic / 100)
    sides: dict[str, list[str]] = {CANARY: [], STABLE: []}
    quota = {CANARY: want, STABLE: count - want}
    i = 0
    while any(len(sides[v]) < quota[v] for v in sides):
        sid = f"s{i}"
        side = split([(CANARY, traffic)], STABLE, bucket(MODEL, sticky_key(session=sid)))
        if len(sides[side]) < quota[side]:
            sides[side].append(sid)
        i += 1
    return [sides[CANARY if (j + 1) * want // count > j * want // count else STABLE].pop() for j in range(count)]


@dataclass
class Outcome:
    """One request as the client saw it (unix seconds); `version` from the response's header."""

    start: float
    end: float = 0.0
    version: str = ""
    ttft: float | None = None
    error: str = ""


@dataclass
class Load:
    """Streamed chat requests at `rate` per second (open loop), or from `concurrency` clients (closed loop)."""

    url: str
    sessions: list[str]
    rate: float = 0.0
    concurrency: int = 0
    max_tokens: int = 8
    outcomes: list[Outcome] = field(default_factory=list)

    async def one(self, http: httpx.AsyncClient, i: int) -> None:
        out = Outcome(time.time())
        body = {"model": MODEL, "max_tokens": self.max_tokens, "stream": True,
                "messages": [{"role": "user", "content": f"Hello {i}"}]}
        first, done = 0.0, False
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body,
                                   headers={SESSION_HEADER: self.sessions[i % len(self.sessions)]}) as reply:
                out.version = reply.headers.get(VERSION_HEADER, "")
                if reply.status_code != 200:
                    out.error = f"HTTP {reply.status_code}: {(await reply.aread())[-200:]!r}"
                async for line in reply.aiter_lines():
                    if out.error or not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out.error = f"error event: {str(chunk['error'])[:200]}"
                    elif not first and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                        first = time.time()
        except httpx.HTTPError as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        out.end = time.time()
        if not out.error and not done:
            out.error = "the stream ended without [DONE]"
        out.ttft = first - out.start if first else None
        self.outcomes.append(out)

    async def run(self, stop: asyncio.Event) -> None:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits, trust_env=False) as http:
            counter = iter(range(10**9))
            if self.concurrency:
                async def lane() -> None:
                    while not stop.is_set():
                        await self.one(http, next(counter))
                await asyncio.gather(*(lane() for _ in range(self.concurrency)))
                return
            tasks: set[asyncio.Task[None]] = set()
            due = time.monotonic()
            while not stop.is_set():
                task = asyncio.ensure_future(self.one(http, next(counter)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                due += 1 / self.rate
                try:
                    await asyncio.wait_for(stop.wait(), timeout=max(0.0, due - time.monotonic()))
                except TimeoutError:
                    pass
            await asyncio.gather(*tasks)


@dataclass
class Poll:
    """The scheduler's counters for the model at `at`: requests by (version, outcome), the cumulative buckets
    of its latency histograms by (ttft|tpot, version) as {upper bound: count}, the canary's rollbacks by reason."""

    at: float
    requests: dict[tuple[str, str], float] = field(default_factory=dict)
    buckets: dict[tuple[str, str], dict[float, float]] = field(default_factory=dict)
    rollbacks: dict[str, float] = field(default_factory=dict)

    def served(self, version: str, failed_only: bool = False) -> float:
        return sum(n for (v, outcome), n in self.requests.items() if v == version and
                   (outcome != "ok" or not failed_only))


async def scrape(http: httpx.AsyncClient, port: int) -> Poll:
    text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    poll = Poll(time.time())
    for line in text.splitlines():
        match = _SAMPLE.match(line) if line.startswith(("infermesh_scheduler_version", "infermesh_rollbacks")) \
            else None
        if match is None:
            continue
        name, labels, value = match[1], dict(_LABEL.findall(match[2])), float(match[3])
        if labels.get("model") != MODEL:
            continue
        if name == "infermesh_scheduler_version_requests_total":
            poll.requests[(labels["version"], labels["outcome"])] = value
        elif name.startswith("infermesh_scheduler_version_t") and name.endswith("_seconds_bucket"):
            # ttft or tpot; the scheduler observes exactly the window's latency samples (ok, and > 0)
            poll.buckets.setdefault((name.split("_")[3], labels["version"]), {})[float(labels["le"])] = value
        elif name == "infermesh_rollbacks_total" and labels.get("version") == CANARY:
            poll.rollbacks[labels["reason"]] = value
    return poll


def quantile(buckets: dict[float, float], q: float) -> tuple[float | None, int]:
    """Prometheus' histogram_quantile of cumulative buckets (linear within the bucket), and the count."""
    total = buckets.get(float("inf"), 0.0)
    below, lower = 0.0, 0.0
    for upper, count in sorted(buckets.items()):
        if total and count >= q * total:
            if upper == float("inf"):
                return lower, int(total)
            return lower + (upper - lower) * (q * total - below) / max(count - below, 1e-9), int(total)
        below, lower = count, upper
    return None, int(total)


def window_stats(polls: list[Poll], version: str, window_s: float) -> Stats:
    """A version's window as the scheduler saw it at the last poll, from its counters less those older than the
    window: the counts exact, the p95s estimated from its histograms' buckets (it exports no exact ones)."""
    last = polls[-1]
    old = next((p for p in reversed(polls) if p.at <= last.at - window_s), Poll(0.0))
    p95s = {}
    for kind in ("ttft", "tpot"):
        now_b, old_b = last.buckets.get((kind, version), {}), old.buckets.get((kind, version), {})
        p95s[kind] = quantile({le: n - old_b.get(le, 0.0) for le, n in now_b.items()}, 0.95)
    return Stats(requests=int(last.served(version) - old.served(version)),
                 failed=int(last.served(version, failed_only=True) - old.served(version, failed_only=True)),
                 ttft_p95=p95s["ttft"][0], ttft_n=p95s["ttft"][1], tpot_p95=p95s["tpot"][0], tpot_n=p95s["tpot"][1])


def rule_met(policy: Rollback, c: Stats, s: Stats) -> str:
    """The reason the catalog's rollback rule gives for these windows ('' for none): the scheduler's rule."""
    if c.requests >= policy.min_requests and c.error_rate > policy.max_error_rate and c.error_rate > s.error_rate:
        return "error_rate"
    for name, ours, theirs, ours_n, theirs_n, ratio in (
            ("ttft", c.ttft_p95, s.ttft_p95, c.ttft_n, s.ttft_n, policy.max_ttft_ratio),
            ("tpot", c.tpot_p95, s.tpot_p95, c.tpot_n, s.tpot_n, policy.max_tpot_ratio)):
        if ours is not None and theirs and min(ours_n, theirs_n) >= policy.min_requests and ours > ratio * theirs:
            return name
    return ""


class CanaryMesh:
    """v1's and v2's simulated workers, a scheduler with the catalog and a frontend, over a shared tokenizer."""

    def __init__(self, logs: Path, model_dir: Path, tokenizer: ServiceProcess, catalog: str,
                 stable: dict[str, Any], canary: dict[str, Any]) -> None:
        self.catalog = logs / "catalog.yaml"
        self.catalog.write_text(catalog)
        self.procs: list[ServiceProcess] = []
        try:
            workers = [start_sim_worker(logs, model=f"{MODEL}@{v}={model_dir}", wait=False, **options)
                       for v, options in ((STABLE, stable), (CANARY, canary))]
            self.procs += workers
            for worker in workers:
                worker.wait_healthy(60)
            self.metrics_port = free_port()
            self.scheduler = start_scheduler(logs, [w.address for w in workers], catalog=str(self.catalog),
                                             state_file=str(logs / "state.json"), metrics_port=self.metrics_port)
            self.procs.append(self.scheduler)
            self.frontend: FrontendProcess = start_frontend(logs, tokenizer.address, self.scheduler.address,
                                                            catalog=str(self.catalog))
            self.procs.append(self.frontend.wait_ready())
        except BaseException:
            self.stop()
            raise

    def versions(self) -> dict[str, dict[str, Any]]:
        models = httpx.get(self.frontend.url + "/v1/models", timeout=5, trust_env=False).json()["data"]
        return {v["version"]: v for m in models if m["id"] == MODEL for v in m.get("versions", [])}

    def wait_canary(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.versions().get(CANARY, {}).get("state") != "canary":
            if time.monotonic() > deadline:
                raise TimeoutError(f"the canary takes no traffic within {timeout}s: {self.versions()}")
            time.sleep(0.1)

    def warm_up(self, requests: int = 8) -> None:
        """Requests pinned to the stable version: the frontend loads a version's tokenizer at its first request
        (v2's first request still pays that)."""
        for i in range(requests):
            body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": f"Hi {i}"}]}
            httpx.post(self.frontend.url + "/v1/chat/completions", json=body, headers={VERSION_HEADER: STABLE},
                       timeout=30, trust_env=False).raise_for_status()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def phase(outcomes: list[Outcome], start: float, end: float) -> dict[str, Any]:
    """The load's requests started within [start, end): their throughput and TTFT per version serving them."""
    chosen = [o for o in outcomes if start <= o.start < end and not o.error]
    per: dict[str, Any] = {}
    for v in sorted({o.version for o in chosen}):
        ttfts = sorted(o.ttft for o in chosen if o.version == v and o.ttft is not None)
        per[v] = {"requests": len(ttfts), "ttft_ms_p50": ms(ttfts[len(ttfts) // 2]) if ttfts else None,
                  "ttft_ms_p95": ms(p95(ttfts))}
    return {"seconds": round(end - start, 2), "requests": len(chosen),
            "throughput_rps": round(len(chosen) / (end - start), 1) if end > start else None, "versions": per}


async def observe(mesh: CanaryMesh, load: Load, policy: Rollback, seconds: float, after_s: float) -> dict[str, Any]:
    """Runs the load, polling the scheduler, until `after_s` past the rollback or `seconds` in all."""
    stop, polls = asyncio.Event(), list[Poll]()
    crossed: tuple[float, str] | None = None
    seen_rollback: Poll | None = None
    started = time.time()
    running = asyncio.ensure_future(load.run(stop))
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        while not running.done():
            tick = time.monotonic()
            polls.append(await scrape(http, mesh.metrics_port))
            now = polls[-1].at
            if crossed is None:
                reason = rule_met(policy, window_stats(polls, CANARY, policy.window_s),
                                  window_stats(polls, STABLE, policy.window_s))
                crossed = (now, reason) if reason else None
            if seen_rollback is None and any(polls[-1].rollbacks.values()):
                seen_rollback = polls[-1]
            if now >= started + seconds or (seen_rollback is not None and now >= seen_rollback.at + after_s):
                break
            await asyncio.sleep(max(0.0, POLL_S - (time.monotonic() - tick)))
        stopped = time.time()
        stop.set()
        await running
        await asyncio.sleep(1.0)  # the workers' reports of the last requests
        final = await scrape(http, mesh.metrics_port)
    return {"started": started, "stopped": stopped, "polls": polls, "crossed": crossed,
            "seen_rollback": seen_rollback, "final": final}


def summarize(name: str, fault: dict[str, float], mesh: CanaryMesh, load: Load, policy: Rollback, share: float,
              run: dict[str, Any]) -> dict[str, Any]:
    versions = mesh.versions()
    canary = versions.get(CANARY, {})
    outcomes: list[Outcome] = load.outcomes
    started, stopped, final = run["started"], run["stopped"], run["final"]
    seen: Poll | None = run["seen_rollback"]
    rolled_at: float | None = canary.get("rolled_back_at") or (seen.at if seen is not None else None)
    first = min((o.start for o in outcomes if o.version == CANARY), default=started)
    before = phase(outcomes, started, rolled_at or stopped)
    # The time the load needs to send the canary min_requests requests, at its share of the throughput.
    expected = policy.min_requests / (before["throughput_rps"] * share) if before["throughput_rps"] else None
    served, failed = final.served(CANARY), final.served(CANARY, failed_only=True)
    crossed: tuple[float, str] | None = run["crossed"]
    detail = next((line.split("rolled back: ", 1)[1].split("; its traffic")[0]
                   for line in mesh.scheduler.log().splitlines() if "rolled back: " in line), None)
    errors = [o.error for o in outcomes if o.error]
    return {
        "scenario": name, "canary_fault": fault, "rolled_back": rolled_at is not None,
        "reason": canary.get("rollback_reason"), "scheduler_says": detail,
        "time_to_rollback_s": round(rolled_at - first, 2) if rolled_at else None,
        "expected_s": round(expected, 2) if expected else None,
        "time_to_rollback_vs_expected": round((rolled_at - first) / expected, 2) if rolled_at and expected else None,
        "rule_met_after_s": round(crossed[0] - first, 2) if crossed else None,
        "rule_met_reason": crossed[1] if crossed else None,
        "rule_met_to_rollback_s": round(rolled_at - crossed[0], 3) if rolled_at and crossed else None,
        "bad_version_requests": int(served), "bad_version_failed": int(failed),
        "bad_version_requests_at_rollback": int(seen.served(CANARY)) if seen is not None else None,
        "min_requests": policy.min_requests,
        "overshoot": round(served / policy.min_requests, 2) if rolled_at else None,
        "client_requests": len(outcomes), "client_failures": len(errors), "client_failure_examples": errors[:3],
        "canary_share_of_sessions": round(share, 4), "before": before,
        "after": phase(outcomes, rolled_at, stopped) if rolled_at else None,
        # The scheduler's window as the frontend last heard it (refreshed on a change, else every 5 s).
        "analysis_at_end": {v: versions.get(v, {}).get("analysis") for v in (STABLE, CANARY)},
        "poll_interval_s": POLL_S, "polls": len(run["polls"]),
    }


def run_scenario(name: str, args: argparse.Namespace, model_dir: Path, tokenizer: ServiceProcess,
                 logs: Path) -> dict[str, Any]:
    stable = {"sim_ttft_ms": args.sim_ttft_ms, "sim_itl_ms": args.sim_itl_ms}
    fault = {"fail": {"sim_fail_rate": args.fail_rate}, "slow": {"sim_ttft_ms": args.sim_ttft_ms * args.slow_factor},
             "healthy": {}}[name]
    logs = logs / name
    logs.mkdir(parents=True)
    text = catalog_text(model_dir, args.canary_traffic, args.min_requests, args.window_s)
    mesh = CanaryMesh(logs, model_dir, tokenizer, text, stable, {**stable, **fault})
    try:
        mesh.wait_canary()
        mesh.warm_up()
        policy = load_catalog(mesh.catalog).models[0].rollback
        sessions = session_ids(args.canary_traffic, args.sessions)
        share = sum(1 for s in sessions if split([(CANARY, args.canary_traffic)], STABLE,
                                                 bucket(MODEL, sticky_key(session=s))) == CANARY) / len(sessions)
        load = Load(mesh.frontend.url, sessions, rate=0.0 if args.concurrency else args.rate,
                    concurrency=args.concurrency, max_tokens=args.max_tokens)
        run = asyncio.run(observe(mesh, load, policy, args.seconds, args.after_s))
        return summarize(name, fault, mesh, load, policy, share, run)
    finally:
        mesh.stop()


def cell(value: Any, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| scenario | rolled back | time to rollback | expected (min_requests at the share) | rule met -> "
             "rollback | canary served (failed) | overshoot over min_requests | client failures |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['scenario']} | {r['reason'] or 'no'} | {cell(r['time_to_rollback_s'], ' s')} "
                     f"({cell(r['time_to_rollback_vs_expected'], 'x')}) | {cell(r['expected_s'], ' s')} | "
                     f"{cell(r['rule_met_to_rollback_s'], ' s')} | {r['bad_version_requests']} "
                     f"({r['bad_version_failed']}) | {cell(r['overshoot'], 'x')} | {r['client_failures']} |")
    lines += ["", "| scenario | phase | req/s | v1 TTFT p50 / p95 ms (requests) | v2 TTFT p50 / p95 ms (requests) |",
              "|---|---|---|---|---|"]
    for r in results:
        for name in ("before", "after"):
            p = r[name]
            if p is None:
                continue
            per = [p["versions"].get(v) for v in (STABLE, CANARY)]
            lat = [f"{s['ttft_ms_p50']} / {s['ttft_ms_p95']} ({s['requests']})" if s else "-" for s in per]
            label = name + (" rollback" if r["rolled_back"] else " (no rollback: the whole run)")
            lines.append(f"| {r['scenario']} | {label} | {p['throughput_rps']} | {lat[0]} | {lat[1]} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.canary_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--canary-traffic", type=float, default=20.0, help="the canary's percent of the requests")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=40.0, help="requests per second, open loop (default 40)")
    load.add_argument("--concurrency", type=int, default=0, help="closed-loop clients instead of --rate")
    parser.add_argument("--min-requests", type=int, default=100, help="the catalog's rollback.min_requests")
    parser.add_argument("--window-s", type=float, default=60.0, help="the catalog's rollback.window_s")
    parser.add_argument("--seconds", type=float, default=40.0, help="the longest a scenario's load runs")
    parser.add_argument("--after-s", type=float, default=4.0, help="how long the load goes on after a rollback")
    parser.add_argument("--fail-rate", type=float, default=0.2, help="fail: the canary's --sim-fail-rate")
    parser.add_argument("--slow-factor", type=float, default=4.0, help="slow: the canary's TTFT over the stable's")
    parser.add_argument("--sim-ttft-ms", type=float, default=50.0, help="the workers' --sim-ttft-ms")
    parser.add_argument("--sim-itl-ms", type=float, default=10.0, help="the workers' --sim-itl-ms")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=500, help="sticky sessions the load cycles through")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.rate <= 0 and not args.concurrency:
        parser.error("--rate must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = prepare_default_model()
    logs = Path(tempfile.mkdtemp(prefix="infermesh-canary-bench-"))
    port = free_port()
    models = [a for v in (STABLE, CANARY) for a in ("--model", f"{MODEL}@{v}={model_dir}")]
    tokenizer = ServiceProcess("tokenizer", ["tokenizer", "--port", str(port), "--metrics-port", "0", *models],
                               port=port, log_dir=logs)
    results = []
    try:
        tokenizer.start().wait_healthy(60)
        for name in args.scenarios:
            results.append(run_scenario(name, args, model_dir, tokenizer, logs))
            r = results[-1]
            print(f"{name}: rolled back {r['reason'] or 'no'} after {cell(r['time_to_rollback_s'], ' s')}; the bad "
                  f"version served {r['bad_version_requests']} ({r['bad_version_failed']} failed); "
                  f"{r['client_failures']} client failures", flush=True)
    finally:
        tokenizer.stop()
    print("\n" + table(results))
    print(f"\nlogs: {logs}")
    if args.json is not None:
        doc = {"command": "python -m bench canary " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "scenarios": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
