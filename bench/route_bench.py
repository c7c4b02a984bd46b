"""A route's worth: a mixed workload through a catalog route, the share each model served, the cost against
sending everything to the route's most expensive model, and the time to first token of each.

The workload mixes easy requests (short general questions) and hard ones (code questions, which the demo
route's keyword rule sends to the larger model); `--hard-share` sets the share of hard ones. Each request is
streamed with usage; the model that served it is the response's `x-infermesh-model` header. Costs use the
catalog's prices and each request's own token counts: "all to the largest" prices the same tokens at the
largest target's prices (its tokenizer's counts may differ slightly).

Against a running mesh (the demo: `make up ARGS="--catalog deploy/catalog/demo.yaml"`):

    .venv/bin/python -m bench route --url http://localhost:8080 [--catalog deploy/catalog/demo.yaml]
        [--route auto] [--hard-share 0.3] [--requests 60] [--concurrency 4] [--max-tokens 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from infermesh.common.catalog import TIERS, Catalog, load_catalog

ROOT = Path(__file__).resolve().parents[1]
EASY = ["What is the capital of France?", "Name three colours of the rainbow.", "How many days are in a week?",
        "Say hello in Spanish.", "What do bees make?", "Give me a synonym for happy.",
        "What is the opposite of cold?", "Which planet is closest to the sun?"]
HARD = ["Write a Python function that checks whether a string is a palindrome.",
        "Fix the bug in this Python code: def add(a, b): return a - b",
        "Write a SQL query that counts the orders of each customer.",
        "Write a regex that matches an email address, and explain it.",
        "Write a JavaScript function that debounces another function.",
        "Explain what this Rust code does: fn main() { println!(\"{}\", 2 + 2); }"]


@dataclass
class Sample:
    hard: bool
    model: str
    ttft: float
    prompt_tokens: int
    completion_tokens: int
    ok: bool


def workload(requests: int, hard_share: float, seed: int) -> list[tuple[bool, str]]:
    """`requests` prompts, round(requests * hard_share) of them hard, shuffled reproducibly."""
    rng = random.Random(seed)
    hard = round(requests * hard_share)
    items = [(True, HARD[i % len(HARD)]) for i in range(hard)] + \
            [(False, EASY[i % len(EASY)]) for i in range(requests - hard)]
    rng.shuffle(items)
    return items


async def one(client: httpx.AsyncClient, url: str, route: str, hard: bool, prompt: str, max_tokens: int) -> Sample:
    body = {"model": route, "stream": True, "max_tokens": max_tokens, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}]}
    began = time.perf_counter()
    ttft, usage, model, ok = 0.0, {}, "", False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        model = reply.headers.get("x-infermesh-model", "")
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                ok = ok or line == "data: [DONE]"
                continue
            event = json.loads(line[6:])
            if not ttft and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                ttft = time.perf_counter() - began
            usage = event.get("usage") or usage
    return Sample(hard, model, ttft, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                  ok and reply.status_code == 200)


async def drive(url: str, route: str, items: list[tuple[bool, str]], concurrency: int,
                max_tokens: int) -> list[Sample]:
    queue = list(items)
    samples: list[Sample] = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker() -> None:
            while queue:
                hard, prompt = queue.pop()
                samples.append(await one(client, url, route, hard, prompt, max_tokens))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def report(catalog: Catalog, route: str, samples: list[Sample], hard_share: float) -> dict[str, Any]:
    found = catalog.lookup(route)
    targets = [catalog.resolve(t) for t in getattr(found, "targets", (route,))]
    largest = max(targets, key=lambda m: (TIERS.index(m.tier), m.prices.completion_per_mtok))
    served = [s for s in samples if s.ok]

    def cost(s: Sample, model: str) -> float:
        return catalog.resolve(model).prices.cost(s.prompt_tokens, s.completion_tokens)

    by_model: dict[str, dict[str, Any]] = {}
    for name in sorted({s.model for s in served}):
        mine = [s for s in served if s.model == name]
        ttfts = sorted(s.ttft for s in mine if s.ttft)
        by_model[name] = {
            "tier": catalog.resolve(name).tier, "share": len(mine) / len(served), "requests": len(mine),
            "hard": sum(s.hard for s in mine), "easy": sum(not s.hard for s in mine),
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None}
    routed = sum(cost(s, s.model) for s in served)
    all_large = sum(cost(s, largest.name) for s in served)
    return {"route": route, "hard_share": hard_share, "requests": len(samples), "failed": len(samples) - len(served),
            "largest": largest.name, "models": by_model, "cost_routed": routed, "cost_all_largest": all_large,
            "cost_ratio": routed / all_large if all_large else None,
            "hard_to_largest": (sum(s.hard and s.model == largest.name for s in served) /
                                max(1, sum(s.hard for s in served))),
            "easy_kept_cheaper": (sum(not s.hard and s.model != largest.name for s in served) /
                                  max(1, sum(not s.hard for s in served)))}


def render(result: dict[str, Any]) -> str:
    lines = [f"route {result['route']}: {result['requests']} requests, {result['hard_share']:.0%} hard, "
             f"{result['failed']} failed",
             "| model | tier | share | hard | easy | TTFT p50 | TTFT p95 |", "|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        p50 = f"{m['ttft_p50_s']:.3f} s" if m["ttft_p50_s"] is not None else "-"
        p95 = f"{m['ttft_p95_s']:.3f} s" if m["ttft_p95_s"] is not None else "-"
        lines.append(f"| {name} | {m['tier']} | {m['share']:.1%} | {m['hard']} | {m['easy']} | {p50} | {p95} |")
    ratio = result["cost_ratio"]
    lines.append(f"cost: {result['cost_routed']:.6f} routed vs {result['cost_all_largest']:.6f} all to "
                 f"{result['largest']} ({ratio:.1%} of it)" if ratio is not None else "cost: no priced tokens")
    lines.append(f"hard requests served by {result['largest']}: {result['hard_to_largest']:.0%}; "
                 f"easy requests kept off it: {result['easy_kept_cheaper']:.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the mesh (Envoy or a frontend), e.g. http://localhost:8080")
    parser.add_argument("--catalog", default=str(ROOT / "deploy" / "catalog" / "demo.yaml"),
                        help="the catalog the mesh runs (for its prices and tiers)")
    parser.add_argument("--route", default="auto")
    parser.add_argument("--hard-share", type=float, default=0.3, help="share of hard (code) requests, 0..1")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    if not 0 <= args.hard_share <= 1 or args.requests < 1 or args.concurrency < 1:
        parser.error("--hard-share is in 0..1; --requests and --concurrency are at least 1")
    catalog = load_catalog(args.catalog)
    items = workload(args.requests, args.hard_share, args.seed)
    samples = asyncio.run(drive(args.url.rstrip("/"), args.route, items, args.concurrency, args.max_tokens))
    result = report(catalog, args.route, samples, args.hard_share)
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "samples": [asdict(s) for s in samples]}, indent=1))
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
