"""Pure logic: summaries of load-generator results, ratios, goodput, targets.

Kept free of I/O so tests/bench/ can check it without running anything.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

SLO_TTFT_S = 2.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation, as numpy's default; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def summarize_vllm_bench(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers we compare, from the dict `vllm bench serve` returns (or saves with --save-detailed).

    TTFTs and ITLs are taken from the successful requests only (vLLM's load
    generator records a TTFT of 0 for a failed one); ITL is the time between
    streamed chunks, TPOT the mean time per output token after the first.
    """
    errors = result.get("errors") or [""] * len(result.get("ttfts", []))
    ok = [not e for e in errors]
    ttfts = [t for t, good in zip(result.get("ttfts", []), ok, strict=False) if good]
    itls = [x for chunks, good in zip(result.get("itls", []), ok, strict=False) if good for x in chunks]
    tpots = []
    for lat, ttft, n, good in zip(result.get("latencies", []), result.get("ttfts", []),
                                  result.get("output_lens", []), ok, strict=False):
        if good and n and n > 1:
            tpots.append((lat - ttft) / (n - 1))
    return {
        "completed": result["completed"], "failed": result.get("failed", 0),
        "duration_s": round(result["duration"], 3),
        "request_throughput": round(result["request_throughput"], 4),
        "output_throughput": round(result["output_throughput"], 2),
        "ttft_ms_p50": _ms(percentile(ttfts, 50)), "ttft_ms_p99": _ms(percentile(ttfts, 99)),
        "itl_ms_p50": _ms(percentile(itls, 50)), "itl_ms_p99": _ms(percentile(itls, 99)),
        "tpot_ms_p50": _ms(percentile(tpots, 50)),
    }


def median_of(rounds: Iterable[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return round(statistics.median(values), 4) if values else None


def ratio(mesh: float | None, vllm: float | None) -> float | None:
    if mesh is None or vllm is None or vllm == 0:
        return None
    return round(mesh / vllm, 3)


STEADY_KEYS = ("output_throughput", "request_throughput", "ttft_ms_p50", "itl_ms_p50", "tpot_ms_p50",
               "ttft_ms_p99", "itl_ms_p99")


def steady_point(concurrency: int, vllm_rounds: list[dict], mesh_rounds: list[dict]) -> dict[str, Any]:
    """Medians over rounds of each side, and mesh/vLLM ratios, for one concurrency."""
    row: dict[str, Any] = {"concurrency": concurrency, "rounds": min(len(vllm_rounds), len(mesh_rounds))}
    for key in STEADY_KEYS:
        v, m = median_of(vllm_rounds, key), median_of(mesh_rounds, key)
        row[key] = {"vllm": v, "mesh": m, "ratio": ratio(m, v)}
    row["failed"] = {"vllm": sum(r["failed"] for r in vllm_rounds), "mesh": sum(r["failed"] for r in mesh_rounds)}
    return row


def steady_targets(point: dict[str, Any]) -> dict[str, bool | None]:
    def check(key: str, ok) -> bool | None:
        r = point[key]["ratio"]
        return None if r is None else bool(ok(r))
    return {"throughput >= 1.0x": check("output_throughput", lambda r: r >= 1.0),
            "median TTFT <= 1.05x": check("ttft_ms_p50", lambda r: r <= 1.05),
            "median ITL <= 1.05x": check("itl_ms_p50", lambda r: r <= 1.05)}


def overload_summary(outcomes: Sequence[dict[str, Any]], seconds: float, slo_s: float = SLO_TTFT_S,
                     rate: float | None = None) -> dict[str, Any]:
    """Goodput and latencies of one overload run (outcomes as overload.Outcome dicts).

    goodput: requests that completed with TTFT < slo_s, per second of the
    offered-load window. p99 TTFT: over all completed requests. Refused:
    HTTP 429; their time is until the status line arrived.
    """
    completed = [o for o in outcomes if o["completed"]]
    good = [o for o in completed if o["ttft_s"] is not None and o["ttft_s"] < slo_s]
    refused = [o for o in outcomes if o["status"] == 429]
    other = [o for o in outcomes if not o["completed"] and o["status"] != 429]
    ttfts = [o["ttft_s"] for o in completed]
    refusal = [o["status_s"] for o in refused if o["status_s"] is not None]
    other_http = [o["status_s"] for o in other if o["status"] not in (0, 200) and o["status_s"] is not None]
    statuses: dict[str, int] = {}
    for o in other:
        if o["status"] and o["status"] != 200:
            key = f"HTTP {o['status']}"
        elif o["error"]:
            key = o["error"]
        else:
            key = "200 without a token" if o["status"] == 200 else "no status"
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "offered_rate": rate, "window_s": seconds, "sent": len(outcomes), "completed": len(completed),
        "good": len(good), "goodput_rps": round(len(good) / seconds, 4),
        "completed_within_slo": round(len(good) / len(completed), 4) if completed else None,
        "ttft_ms_p50": _ms(percentile(ttfts, 50)), "ttft_ms_p99": _ms(percentile(ttfts, 99)),
        "refused_429": len(refused),
        "refusal_ms_p50": _ms(percentile(refusal, 50)), "refusal_ms_p99": _ms(percentile(refusal, 99)),
        "refusal_ms_max": _ms(max(refusal)) if refusal else None,
        "other_failures": statuses,
        "other_http_error_ms_p50": _ms(percentile(other_http, 50)),
        "other_http_error_ms_max": _ms(max(other_http)) if other_http else None,
    }


def overload_targets(vllm: dict[str, Any], mesh: dict[str, Any], slo_s: float = SLO_TTFT_S) -> dict[str, bool | None]:
    g = ratio(mesh["goodput_rps"], vllm["goodput_rps"])
    p99 = mesh["ttft_ms_p99"]
    return {"goodput >= 2x": None if g is None else g >= 2.0,
            "p99 TTFT of admitted within SLO": None if p99 is None else p99 < slo_s * 1000}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def steady_table(points: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per concurrency, vLLM / mesh / ratio for the main metrics."""
    head = ["concurrency", "rounds"]
    cols = [("output_throughput", "out tok/s"), ("ttft_ms_p50", "TTFT p50 ms"), ("itl_ms_p50", "ITL p50 ms"),
            ("tpot_ms_p50", "TPOT p50 ms"), ("ttft_ms_p99", "TTFT p99 ms")]
    for _, label in cols:
        head += [f"vLLM {label}", f"mesh {label}", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [str(p["concurrency"]), str(p["rounds"])]
        for key, _ in cols:
            cells += [_fmt(p[key]["vllm"]), _fmt(p[key]["mesh"]), _fmt(p[key]["ratio"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overload_table(vllm: dict[str, Any], mesh: dict[str, Any]) -> str:
    rows = [("sent", "sent"), ("completed", "completed"), ("good (TTFT < SLO)", "good"),
            ("goodput req/s", "goodput_rps"), ("TTFT p50 ms (completed)", "ttft_ms_p50"),
            ("TTFT p99 ms (completed)", "ttft_ms_p99"), ("refused (429)", "refused_429"),
            ("429 after, p50 ms", "refusal_ms_p50"), ("429 after, p99 ms", "refusal_ms_p99"),
            ("other failures", "other_failures"), ("other HTTP errors after, p50 ms", "other_http_error_ms_p50"),
            ("other HTTP errors after, max ms", "other_http_error_ms_max")]
    lines = ["| | vLLM server | mesh | ratio |", "|---|---|---|---|"]
    for label, key in rows:
        v, m = vllm[key], mesh[key]
        r = ratio(m, v) if isinstance(v, (int, float)) and isinstance(m, (int, float)) else None
        v_s = ", ".join(f"{k}: {n}" for k, n in v.items()) or "0" if isinstance(v, dict) else _fmt(v)
        m_s = ", ".join(f"{k}: {n}" for k, n in m.items()) or "0" if isinstance(m, dict) else _fmt(m)
        lines.append(f"| {label} | {v_s} | {m_s} | {_fmt(r)} |")
    return "\n".join(lines)
